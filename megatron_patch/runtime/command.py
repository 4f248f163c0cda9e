"""How a command of the project runs: its flags, its logging, its errors and exit codes, its world.

The trainer (``training/cli.py``) and every tool in ``tools/`` parse their flags with
:class:`ArgumentParser` and run their body through :func:`run_main`:

* a :class:`~megatron_patch.errors.UserError` is printed as ONE line ``error: ...`` on stderr by
  rank 0 (the other ranks, which see the same input, log it at WARNING level on stdout) and the
  process exits with the error type's exit code (2 bad input, 1 a failed self-check or a diverged
  run), without a traceback;
* anything else is a bug, or a failure of torch, megatron or the machine: it is printed with its
  traceback and one closing line naming where it was raised (exit code 1);
* Ctrl-C (a ``KeyboardInterrupt``) is one line ``error: interrupted; ...`` saying what was left,
  exit code 130 (128 + SIGINT, as a shell reports it).

Progress goes to stdout through ``logging`` (INFO on rank 0, WARNING elsewhere); only a tool's
final report is printed.
"""

import argparse
import contextlib
import errno
import logging
import os
import sys
import traceback
import warnings
from typing import Callable, Iterator, Optional

from megatron_patch import quiet_known_notices
from megatron_patch.errors import ArgumentError, DataError, UserError
from megatron_patch.runtime.child_processes import end_forked_children_with_parent

logger = logging.getLogger(__name__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags raise ``ArgumentError`` (one line) instead of printing the usage and
    exiting; ``--help`` still prints and exits 0."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ArgumentError(f"{message} (see {self.prog} --help)")


def add_layout_flags(parser: argparse.ArgumentParser, role: str = "") -> None:
    """Megatron's model-parallel layout flags of the checkpoint tools: ``--tensor-model-parallel-size``,
    ``--pipeline-model-parallel-size`` and, mutually exclusive, ``--virtual-pipeline-model-parallel-size
    V`` or ``--num-layers-per-virtual-pipeline-stage N``. ``role`` words the help (e.g. "target")."""
    prefix = f"{role} " if role else ""
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help=f"{prefix}tensor-parallel size (TP)")
    parser.add_argument(
        "--pipeline-model-parallel-size", type=int, default=1, help=f"{prefix}pipeline-parallel size (PP)"
    )
    virtual = parser.add_mutually_exclusive_group()
    virtual.add_argument(
        "--virtual-pipeline-model-parallel-size",
        type=int,
        default=None,
        metavar="V",
        help=f"{prefix}V, virtual pipeline stages (model chunks) per pipeline rank: the interleaved schedule "
        "(needs PP > 1)",
    )
    virtual.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        metavar="N",
        help=f"or the {prefix}layers per chunk",
    )


def add_checkpoint_verify_flag(parser) -> None:
    """``--no-checkpoint-verify`` (sets ``checkpoint_verify`` False) on ``parser`` or an argument group:
    every command that loads a checkpoint checks its files against the manifest unless told not to."""
    parser.add_argument(
        "--no-checkpoint-verify",
        dest="checkpoint_verify",
        action="store_false",
        help="load without checking every file against the checkpoint's manifest (sizes, CRC-32)",
    )


def rank() -> int:
    """This process's rank: torch.distributed's once initialised, else torchrun's RANK (or 0).
    Never imports torch: a command that has not (a bad flag) reports in milliseconds."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def configure_logging(name: str) -> None:
    """Logging to stdout (INFO on rank 0, WARNING elsewhere), megatron's and torch's own loggers at
    WARNING, and megatron's optional-accelerator notices silenced, so that stderr carries only real
    errors."""
    current = rank()
    level = logging.INFO if current == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format=f"%(asctime)s [rank {current}] {name}: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    logging.getLogger("megatron_patch").setLevel(level)
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_known_notices()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")


INTERRUPTED_EXIT_CODE = 130
"""What a command stopped by Ctrl-C (SIGINT) returns: 128 + the signal's number, as shells report it."""


def run_main(
    body: Callable[[], Optional[int]], *, io_errors_are_user_errors: bool = False, kept_after_ctrl_c: str = ""
) -> int:
    """Run a command's body; returns its exit code (``body``'s return value, or 0).

    ``io_errors_are_user_errors``: also report an ``OSError`` (a full disk, a read-only folder met
    while writing outputs) as one line, exit code 2; for tools whose outputs are staged, so nothing
    is left behind then, nor after Ctrl-C (which says so). ``kept_after_ctrl_c``: what the Ctrl-C
    line says is left, where it is neither (the example pipelines keep their finished steps).
    """
    end_forked_children_with_parent()  # a command killed outright leaves no forked helper behind
    try:
        code = body()
    except KeyboardInterrupt:
        left = kept_after_ctrl_c or (
            "nothing was written (outputs are renamed into place only when complete)"
            if io_errors_are_user_errors
            else "what it had finished (e.g. saved checkpoints, complete output files) is kept"
        )
        report(UserError(f"interrupted; {left}"))
        return INTERRUPTED_EXIT_CODE
    except UserError as error:
        report(error)
        return error.exit_code
    except OSError as error:
        if not io_errors_are_user_errors:
            return _unexpected(error)
        if error.errno == errno.ENAMETOOLONG:
            report(DataError(f"{error.filename or 'a file name'}: {error.strerror}; shorten the output name"))
            return DataError.exit_code
        report(
            DataError(
                f"{error.filename or 'I/O'}: {error.strerror or error}; check the free space and "
                f"permissions of the output folder"
            )
        )
        return DataError.exit_code
    except Exception as error:
        return _unexpected(error)
    return 0 if code is None else code


def _unexpected(error: Exception) -> int:
    """Print a failure that is not the user's with its traceback and where it was raised; exit 1."""
    from megatron_patch.runtime import cpu_mode

    traceback.print_exc()
    # the innermost frame that raised it, CPU mode's pass-through of every torch call skipped
    shim = os.path.abspath(cpu_mode.__file__)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) != shim]
    where = f" in {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    first_line = (str(error).splitlines() or [""])[0]
    print(
        f"error: unexpected {type(error).__name__}{where}: {first_line} (traceback above)", file=sys.stderr, flush=True
    )
    return 1


def report(error: UserError) -> None:
    """Print ``error: <message>`` on rank 0; log it on the others."""
    if rank() == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        logger.warning("error: %s", error)


@contextlib.contextmanager
def command_world(cpu: bool) -> Iterator[int]:
    """Join the torchrun world (or form a world of one); yields the world size. A process group
    this call created is destroyed at the end; one that already existed (tests) is left alone."""
    from megatron_patch.runtime import parallel

    with parallel.distributed_world(cpu=cpu) as size:
        yield size
