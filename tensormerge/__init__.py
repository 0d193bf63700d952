"""tensormerge: merge fine-tuned models that share a base, one parameter block at a time."""

__version__ = "0.1.0"
