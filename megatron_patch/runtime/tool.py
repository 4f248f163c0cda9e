"""How a checkpoint tool runs: its errors and exit codes, its logging, its torch.distributed world.

Exit codes: 0 success, 1 the tool's own check of its output failed (``VerificationError``),
2 bad input (``ToolError``, ``CheckpointError``, ``DataError`` or another one-line
``ValueError``). A bad input is reported as ONE line ``error: ...`` on stderr, by rank 0 only
(the other ranks, which see the same input, log it at WARNING level on stdout). Progress goes
to stdout through ``logging``; only the final report is printed.
"""

import argparse
import contextlib
import logging
import os
import sys
import warnings
from typing import Callable, Iterator, Optional

from megatron_patch import quiet_known_notices

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2


class ToolError(ValueError):
    """Bad input: a one-line message naming the value, the file and the fix (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split("\n")))


class VerificationError(RuntimeError):
    """The tool's check of its own output failed (exit code 1); nothing was left behind."""


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``ToolError`` (one line) instead of printing usage and exiting."""

    def error(self, message: str):
        raise ToolError(f"{message} (see {self.prog} --help)")


def rank() -> int:
    """This process's rank: torch.distributed's once initialised, else torchrun's RANK (or 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def configure(name: str) -> None:
    """Logging to stdout (INFO on rank 0, WARNING elsewhere) and megatron's optional-accelerator
    notices silenced, so that stderr carries only real errors."""
    current = rank()
    logging.basicConfig(
        level=logging.INFO if current == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {current}] {name}: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    logging.getLogger("megatron_patch").setLevel(logging.INFO if current == 0 else logging.WARNING)
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_known_notices()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")


@contextlib.contextmanager
def tool_world(cpu: bool) -> Iterator[int]:
    """Join the torchrun world (or form a world of one); yields the world size. A process group
    this call created is destroyed at the end; one that already existed (tests) is left alone."""
    from megatron_patch.runtime import parallel

    with contextlib.ExitStack() as stack:
        try:
            size = stack.enter_context(parallel.distributed_world(cpu=cpu))
        except RuntimeError as error:  # no GPU without --cpu, or --cpu beside a GPU
            raise ToolError(str(error)) from None
        yield size


def run_tool(body: Callable[[], Optional[int]]) -> int:
    """Run a tool's body and turn its failures into one-line errors and exit codes."""
    from megatron_patch.data.errors import DataError
    from megatron_patch.checkpoint.store import CheckpointError

    try:
        code = body()
    except VerificationError as error:
        _report(error)
        return EXIT_VERIFICATION_FAILED
    except (ToolError, CheckpointError, DataError, ValueError) as error:
        _report(error)
        return EXIT_BAD_INPUT
    return EXIT_OK if code is None else code


def _report(error: Exception) -> None:
    message = " ".join(str(error).split())
    if rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        logger.warning("error: %s", message)
