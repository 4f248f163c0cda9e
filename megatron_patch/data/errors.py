"""Transitional: the data tools' names for the project's one error path (``megatron_patch.errors``,
``runtime.command``); removed once every tool runs through ``run_main``."""

from megatron_patch.errors import DataError, UserError
from megatron_patch.runtime.command import ArgumentParser

EXIT_USER_ERROR = DataError.exit_code

__all__ = ["ArgumentParser", "DataError", "EXIT_USER_ERROR", "user_error_line"]


def user_error_line(error: Exception) -> str:
    """The line a data tool prints for a ``UserError``, or an ``OSError`` met while writing its
    outputs (a full disk, a read-only folder: the staged partial outputs are already removed)."""
    if isinstance(error, OSError) and not isinstance(error, UserError):
        return (f"error: {error.filename or 'I/O'}: {error.strerror or error}; check the free space "
                f"and permissions of the output folder")
    return f"error: {error}"
