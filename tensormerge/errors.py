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


# Error lines quote values the user or a file gave; a hostile one can be megabytes long.
SHORT_CHARS = 200


def short(value) -> str:
    """repr of a value for an error line, cut to SHORT_CHARS (repr also escapes newlines and
    terminal control codes, so the error stays one plain line)."""
    text = repr(value)
    return text if len(text) <= SHORT_CHARS else text[: SHORT_CHARS - 3] + "..."


def one_line(text, limit: int) -> str:
    """Printable, one line, at most `limit` characters: for quoting what something outside
    tensormerge said (a scheduler's reply, a user's evaluation command, an exception from a
    library), which may hold anything, terminal escape codes and megabytes included."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(text))
    clean = " ".join(clean.split())
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def printable(name: str) -> str:
    """A name from a file as a listing shows it: as it is where every character prints, else with
    the others escaped (a tensor named "a\\rb" must not rewrite the listing's line on a terminal)."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
