"""``pretrain_patch_gpt``: the trainer's command line (run under torchrun, or alone for one process).

Exit codes follow ``runtime.command.run_main``: 0 success (or a stop saved after SIGTERM), 2 bad
input (one line), 1 a diverged run (one line) or an unexpected failure (with its traceback).
"""

import sys
from typing import List, Optional

from megatron_patch.runtime.command import configure_logging, run_main


def main(argv: Optional[List[str]] = None, process_exits: bool = False) -> int:
    """The trainer on ``argv`` (default: the command line); returns the exit code. ``process_exits``:
    the process ends when this returns (the command line), so stop signals that arrive after the run
    are ignored rather than handed back to the caller's handlers."""
    configure_logging("train")  # before the first import of megatron.core (some notices fire on import)

    def body() -> None:
        from megatron_patch.training.arguments import parse_args

        config = parse_args(argv)
        from megatron_patch.runtime import parallel
        from megatron_patch.training.loop import Trainer
        from megatron_patch.training.preemption import StopSignals

        # held until the command returns: a stop signal during start-up stops the run at its first
        # step (with a checkpoint); one during the teardown after the last save is only noted, and
        # (process_exits) one after it ignored. The time limit counts from here.
        checkpoints = config.checkpoints
        stop_signals = StopSignals(
            checkpoints.stop_signals,
            time_limit_minutes=checkpoints.exit_duration_minutes,
            ignore_on_exit=process_exits,
        )
        with stop_signals as stop, parallel.distributed_world(cpu=config.cpu):
            model = config.model
            parallel.init_model_parallel(
                model.tensor_parallel, model.pipeline_parallel, model.virtual_pipeline_parallel, seed=config.seed
            )
            Trainer(config, stop).run()

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main(process_exits=True))
