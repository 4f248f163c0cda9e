"""The project's one-line errors.

Every error the project raises for a user to act on is a :class:`UserError`: its message is one
line that names the bad value, the file (and line) where there is one, and the fix. The command
runner (``runtime.command.run_main``, used by the trainer and every tool) prints it as
``error: <message>`` on rank 0 and exits with the error type's ``exit_code``, without a traceback.
Anything else that escapes a command is a bug or a failure of torch or megatron and keeps its
traceback (exit code 1).

Exit codes: 2 for bad input (flags, data, checkpoints); 1 for a run that cannot go on although its
input was valid (a self-check of a tool's output failed, the loss diverged).
"""


class UserError(ValueError):
    """A one-line error for the user (exit code 2 unless a subclass says otherwise)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ArgumentError(UserError):
    """A bad flag or flag combination."""


class DataError(UserError):
    """A bad input file, path or line of a corpus, dataset or tokenizer."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, corrupt or of another model."""


class VerificationError(UserError):
    """A tool's check of its own output failed; nothing was left behind (exit code 1)."""

    exit_code = 1


class NonFiniteLossError(UserError):
    """The loss of a training step was NaN or Inf; the step was not applied (exit code 1)."""

    exit_code = 1


class ProcessDiedError(UserError):
    """A helper process of a tool died (killed by a signal, e.g. the out-of-memory killer); the
    tool stopped and left no output (exit code 1)."""

    exit_code = 1


def last_line(error: BaseException) -> str:
    """The last non-empty line of an exception's message (torch's are many lines long), cut to 200
    characters: what a one-line error quotes of a failure inside torch or megatron."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__
