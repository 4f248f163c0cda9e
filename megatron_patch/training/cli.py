"""``pretrain_patch_gpt``: the trainer's command line (run under torchrun, or alone for one process)."""

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

from megatron_patch import quiet_known_notices


def _configure_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


PACKAGE_DIR = Path(__file__).resolve().parents[1]
CPU_MODE_SHIM = PACKAGE_DIR / "runtime" / "cpu_mode.py"  # passes every torch call through in CPU mode


def _origin(error: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost frame that raised ``error``, the CPU-mode pass-through skipped."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() != CPU_MODE_SHIM]
    return frames[-1] if frames else None


def _in_this_package(origin: Optional[traceback.FrameSummary]) -> bool:
    """True for megatron_patch code: one of its own checks, whose message already says what to
    change. Anything else (torch, megatron, NCCL) is a failure to be shown with its traceback."""
    return origin is not None and Path(origin.filename).resolve().is_relative_to(PACKAGE_DIR)


def main(argv: Optional[List[str]] = None) -> int:
    """Train; returns 0 on success (or a SIGTERM-saved stop), 1 on a stopped run or an unexpected
    failure (printed with its traceback), 2 on bad input (one line)."""
    rank = int(os.environ.get("RANK", "0"))
    _configure_logging(rank)
    quiet_known_notices()  # before the first import of megatron.core (some notices fire on import)
    from megatron_patch.training.arguments import ArgumentError, parse_args

    try:
        args = parse_args(argv)
    except ArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # megatron's recommendation for its TP/SP communication overlap, read when CUDA starts (a
    # value set by the launcher wins; on CPU it only silences megatron's reminder)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron_patch.runtime import parallel
    from megatron_patch.checkpoint.store import CheckpointError
    from megatron_patch.training.loop import Trainer
    from megatron_patch.training.step import NonFiniteLossError

    try:
        with parallel.distributed_world(cpu=args.cpu):
            parallel.init_model_parallel(
                args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed
            )
            Trainer(args).run()
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError, RuntimeError) as error:
        origin = _origin(error)
        if isinstance(error, CheckpointError) or _in_this_package(origin):
            print(f"error: {error}", file=sys.stderr)
            return 2
        traceback.print_exc()
        where = f" in {origin.filename}:{origin.lineno}" if origin is not None else ""
        first_line = (str(error).splitlines() or [""])[0]
        print(f"error: unexpected {type(error).__name__}{where}: {first_line} (traceback above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
