"""The trainer's flags checked against their ranges and each other, before any plan is made.

Every check raises a one-line :class:`~megatron_patch.errors.ArgumentError` naming the flag, its
value and what to change (else torch or megatron would fail later, with a traceback, or the run
would fail at its very end); an ``--eval-interval`` with validation off is only warned about.
Batch sizes and token budgets are checked where the run is planned
(:func:`megatron_patch.training.plan.make_plan`).
"""

import argparse
import logging
import math
import os
from typing import Optional

from megatron_patch.data.staging import nearest_existing
from megatron_patch.errors import ArgumentError
from megatron_patch.runtime.command import rank

logger = logging.getLogger(__name__)

SEED_LIMIT = 2**32  # numpy's RandomState (megatron's dataset shuffles) takes seeds 0 .. 2**32 - 1


def check_flag_ranges(flags: argparse.Namespace) -> None:
    """Optimizer and data flags out of range."""
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(flags, name)
        if not 0.0 <= value < 1.0:
            raise ArgumentError(f"--{name.replace('_', '-')} {value} must lie in [0, 1) (defaults 0.9 and 0.95)")
    if not 0.0 < flags.adam_eps < math.inf:
        raise ArgumentError(f"--adam-eps {flags.adam_eps} must be > 0 (default 1e-8)")
    if not 0.0 <= flags.weight_decay < math.inf:
        raise ArgumentError(f"--weight-decay {flags.weight_decay} must be >= 0 (0: no decay; default 0.1)")
    if flags.make_vocab_size_divisible_by < 1:
        raise ArgumentError(
            f"--make-vocab-size-divisible-by {flags.make_vocab_size_divisible_by} must be >= 1 (default 128)"
        )
    if flags.num_workers < 0:
        raise ArgumentError(f"--num-workers {flags.num_workers} must be >= 0 (0: batches are read in the trainer)")
    cpus = os.cpu_count() or 1
    if flags.num_workers > cpus:
        raise ArgumentError(
            f"--num-workers {flags.num_workers} is more than this machine's {cpus} CPUs (every rank starts that "
            f"many reader processes): use at most {cpus} (the launch scripts use 2)"
        )
    if not 0 <= flags.seed < SEED_LIMIT:
        raise ArgumentError(f"--seed {flags.seed} must lie in [0, {SEED_LIMIT - 1}] (numpy's range; default 1234)")


def check_flag_combinations(flags: argparse.Namespace, seq_length: int) -> None:
    """Flags that contradict each other, or need another flag (``seq_length``: T of the run)."""
    tp = flags.tensor_model_parallel_size
    if flags.overlap_param_gather and not (flags.use_distributed_optimizer and flags.overlap_grad_reduce):
        raise ArgumentError(
            "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce: add them"
        )
    if flags.sequence_parallel and tp == 1:
        raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1: drop the flag")
    if flags.sequence_parallel and seq_length % tp:
        raise ArgumentError(
            f"--sequence-parallel: --seq-length {seq_length} must be divisible by "
            f"--tensor-model-parallel-size {tp} (each rank holds whole patches)"
        )
    K = flags.patch_size
    if K == 1 and flags.stage == "patch":
        raise ArgumentError("--stage patch needs --patch-size > 1 (K=1 is token-level training)")
    if K > 1 and not 0.0 < flags.patch_data_fraction < 1.0:
        raise ArgumentError(f"--patch-data-fraction {flags.patch_data_fraction} must lie in (0, 1); the paper uses 2/3")
    if K == 1 and not 0.0 <= flags.patch_data_fraction < 1.0:  # unused at K=1, but a typo all the same
        raise ArgumentError(
            f"--patch-data-fraction {flags.patch_data_fraction} must lie in (0, 1) (and has no effect at "
            f"--patch-size 1, token-level training): drop it, or give K > 1"
        )
    if flags.pretrained_checkpoint and flags.stage != "token":
        raise ArgumentError("--pretrained-checkpoint is for --stage token (the patch stage starts from scratch)")
    if flags.wandb_project is not None and not flags.wandb_project.strip():
        raise ArgumentError("--wandb-project is empty: name the W&B project (or drop the flag)")
    if flags.wandb_project is not None and not flags.wandb_exp_name:
        raise ArgumentError(f"--wandb-project {flags.wandb_project} needs --wandb-exp-name: name the run")
    if flags.save_interval is not None and flags.save_interval < 1:
        raise ArgumentError(f"--save-interval {flags.save_interval} must be >= 1")
    if flags.save_interval and not flags.save:
        raise ArgumentError("--save-interval needs --save DIR")
    if flags.async_save and not flags.save:
        raise ArgumentError("--async-save needs --save DIR")
    if flags.exit_duration_in_mins is not None and not flags.exit_duration_in_mins > 0:
        raise ArgumentError(f"--exit-duration-in-mins {flags.exit_duration_in_mins} must be > 0")
    if flags.exit_duration_in_mins and not flags.save:
        raise ArgumentError("--exit-duration-in-mins needs --save DIR (the run saves a checkpoint when it stops)")
    if flags.manual_gc_interval is not None and flags.manual_gc_interval < 0:
        raise ArgumentError(f"--manual-gc-interval {flags.manual_gc_interval} must be >= 0 (0: collect at start only)")
    if flags.manual_gc_interval is not None and not flags.manual_gc:
        raise ArgumentError(
            f"--manual-gc-interval {flags.manual_gc_interval} needs --manual-gc (without it Python collects "
            f"garbage as usual): add --manual-gc or drop --manual-gc-interval"
        )
    for name in ("profile_step_start", "profile_step_end", "profile_ranks", "profile_dir"):
        value = getattr(flags, name)  # None: not given
        if value is not None and not flags.profile:
            flag = "--" + name.replace("_", "-")
            value = " ".join(map(str, value)) if isinstance(value, list) else value
            raise ArgumentError(
                f"{flag} {value} needs --profile (nothing is profiled without it): add --profile or drop {flag}"
            )
    if flags.eval_iters < 0:
        raise ArgumentError(f"--eval-iters {flags.eval_iters} must be >= 0 (0 turns validation off)")
    if flags.eval_interval is not None and flags.eval_interval < 1:
        raise ArgumentError(f"--eval-interval {flags.eval_interval} must be >= 1")
    if flags.eval_interval is not None and flags.eval_iters == 0 and rank() == 0:
        # a warning, not a refusal: the launch scripts pass an --eval-interval, and appending
        # --eval-iters 0 to them is how validation is turned off
        logger.warning("--eval-interval %d does nothing with --eval-iters 0 (validation is off)", flags.eval_interval)
    if flags.keep_last_checkpoints < 0:
        raise ArgumentError(f"--keep-last-checkpoints {flags.keep_last_checkpoints} must be >= 0")
    if not math.isfinite(flags.save_lock_wait) or flags.save_lock_wait < 0:
        raise ArgumentError(f"--save-lock-wait {flags.save_lock_wait} must be a number of seconds >= 0")
    if (
        not (math.isfinite(flags.lr) and math.isfinite(flags.min_lr))
        or not 0 <= flags.min_lr <= flags.lr
        or flags.lr <= 0
    ):
        raise ArgumentError(f"--lr {flags.lr} / --min-lr {flags.min_lr}: need finite 0 <= min-lr <= lr and lr > 0")
    if flags.lr_warmup_iters < 0:
        raise ArgumentError(f"--lr-warmup-iters {flags.lr_warmup_iters} must be >= 0")
    if not math.isfinite(flags.clip_grad) or flags.clip_grad < 0:
        raise ArgumentError(f"--clip-grad {flags.clip_grad} must be >= 0 (0 disables clipping)")
    if flags.data_path and len(flags.data_path) > 1 and len(flags.data_path) % 2:
        raise ArgumentError(f"--data-path takes one prefix or weight/prefix pairs; got {len(flags.data_path)} values")
    if flags.pretrained_checkpoint and not os.path.isdir(flags.pretrained_checkpoint):
        raise ArgumentError(f"--pretrained-checkpoint {flags.pretrained_checkpoint}: no such directory")


def check_output_paths(flags: argparse.Namespace) -> None:
    """``--summary-json``, ``--tensorboard-dir`` and ``--profile-dir`` can be created and written."""
    _check_summary_json(flags.summary_json)
    _check_folder("--tensorboard-dir", flags.tensorboard_dir)
    _check_folder("--profile-dir", flags.profile_dir)


def _check_summary_json(path: Optional[str]) -> None:
    """``--summary-json`` is written when the run ends (or stops), its folder created then (it may
    be inside ``--save``): a folder that could not be created or written must be refused now, else
    the run would fail at its very end."""
    if path is None:
        return
    if not path:
        raise ArgumentError("--summary-json needs a file path (e.g. --summary-json summary.json)")
    if os.path.isdir(path):
        raise ArgumentError(
            f"--summary-json {path} is a directory: name a file in it (e.g. {os.path.join(path, 'summary.json')})"
        )
    _check_creatable("--summary-json", path, os.path.dirname(os.path.abspath(path)), "a file in a folder")


def _check_folder(flag: str, path: Optional[str]) -> None:
    """An output folder the run creates later (``--tensorboard-dir`` once the model is built, the
    profiler's at its window): a file in its place, or a folder that could not be created or
    written, is refused now."""
    if path:
        _check_creatable(flag, path, os.path.abspath(path), "a folder")


def _check_creatable(flag: str, path: str, folder: str, what: str) -> None:
    """ArgumentError unless ``folder`` (``path``'s, created when missing) is or can be a folder
    this process writes to: the nearest part of it that exists is a writable folder."""
    existing = nearest_existing(folder)
    if not os.path.isdir(existing):
        raise ArgumentError(f"{flag} {path}: {existing} on its path is a file: name {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(f"{flag} {path}: {existing} is not writable: name {what} you can write to")


def _virtual_flag(flags: argparse.Namespace, virtual: int) -> str:
    """The virtual-pipeline flag as given, for messages."""
    if flags.num_layers_per_virtual_pipeline_stage is not None:
        return f"--num-layers-per-virtual-pipeline-stage {flags.num_layers_per_virtual_pipeline_stage} (V={virtual})"
    return f"--virtual-pipeline-model-parallel-size {virtual}"


def check_interleaved_microbatches(plan, pp: int, flags: argparse.Namespace, virtual: int) -> None:
    """megatron's interleaved schedule (``virtual`` chunks per rank) runs a step's micro-batches in
    groups of PP: in every stage (validation too) they must be a multiple of PP."""
    virtual_flag = _virtual_flag(flags, virtual)
    stages = list(plan.stages) + ([plan.validation] if plan.validation.iterations else [])
    for stage in stages:
        if stage.num_microbatches % pp:
            K, b, dp = stage.patch_size, stage.micro_batch_size, plan.data_parallel_size
            factors, names = f"{b} x {dp} x {pp}", "micro-batch x data-parallel x PP"
            if K > 1:
                factors, names = f"{K} x {factors}", f"K x {names}"
            raise ArgumentError(
                f"{virtual_flag}: the {stage.name} stage has {stage.num_microbatches} micro-batches per step, not "
                f"a multiple of --pipeline-model-parallel-size {pp} (interleaved schedule): make --global-batch-size "
                f"{plan.global_batch_size} a multiple of {names} = {factors} = {K * b * dp * pp}, or lower "
                f"--micro-batch-size"
            )
