"""Arithmetic on tensors only: no names of files, no I/O. `reference` defines each method's math."""
