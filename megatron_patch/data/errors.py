"""The user-error class of the data tools and of the stage datasets.

A :class:`DataError` is a mistake in the user's input (a path, a flag, a line of a corpus), never
a bug. Its message is one line that names the bad value, the file (and line) where there is one,
and the fix. The tools in ``tools/`` catch it in ``main()``, print ``error: <message>`` to stderr
and return exit code 2, without a traceback (:func:`user_error_line` words it).
"""

import argparse

EXIT_USER_ERROR = 2
"""Exit code of the data tools for a :class:`DataError`."""


class DataError(ValueError):
    """A user error with a one-line message: what is wrong, where, and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(str(message).replace("\r", " ").replace("\n", " "))


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` parser of the tools: a bad flag raises :class:`DataError` (one line, exit 2 in
    ``main``) instead of printing the usage and exiting."""

    def error(self, message: str):
        raise DataError(f"{message} (see {self.prog} --help)")


def user_error_line(error: Exception) -> str:
    """The line a tool prints for a :class:`DataError`, or an ``OSError`` met while writing its
    outputs (a full disk, a read-only folder: the staged partial outputs are already removed)."""
    if isinstance(error, OSError):
        return (f"error: {error.filename or 'I/O'}: {error.strerror or error}; check the free space "
                f"and permissions of the output folder")
    return f"error: {error}"
