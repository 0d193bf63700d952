"""Typed errors. Each carries one line a user can act on; the CLI prints it and exits non-zero."""


class TensorMergeError(Exception):
    """Base of every error tensormerge expects and explains."""

    exit_code = 1


class InputError(TensorMergeError):
    """A checkpoint or statistics input is missing, unreadable, malformed or inconsistent."""

    exit_code = 2


class ParameterError(TensorMergeError):
    """A method name, method parameter or option is unknown or out of range."""

    exit_code = 2


class OutputError(TensorMergeError):
    """The output cannot be created: it exists, or the disk refused a write."""

    exit_code = 3


class BudgetError(TensorMergeError):
    """A block cannot be processed within --max-memory; the message says how much it needs."""

    exit_code = 4
