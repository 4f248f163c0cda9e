"""The trainer's flags (:mod:`~megatron_patch.training.flags`) turned into its configuration.

``parse_args`` checks the flags against each other and the world size (one-line ``ArgumentError``
saying what to change) and turns them into a frozen :class:`~megatron_patch.training.config.TrainerConfig`:
the run plan (every batch, shape and step count) and one settings object per concern. Nothing is
written back onto the parsed flags.
"""

import argparse
import logging
import math
import os
from typing import List, Optional

from megatron_patch.architecture.build import ModelSettings, padded_vocab_size
from megatron_patch.architecture.presets import check_layout, get_preset
from megatron_patch.architecture.specs import resolve_transformer_impl
from megatron_patch.data.staging import nearest_existing
from megatron_patch.errors import ArgumentError
from megatron_patch.runtime.command import rank
from megatron_patch.runtime.parallel import resolve_virtual_pipeline
from megatron_patch.training.config import (
    CheckpointSettings,
    DataSettings,
    LogSettings,
    OptimizerSettings,
    ProfileSettings,
    TrainerConfig,
)
from megatron_patch.training.flags import PROFILE_RANKS, PROFILE_STEP_END, PROFILE_STEP_START, build_parser
from megatron_patch.training.plan import make_plan
from megatron_patch.training.preemption import parse_signals

logger = logging.getLogger(__name__)

SEED_LIMIT = 2**32  # numpy's RandomState (megatron's dataset shuffles) takes seeds 0 .. 2**32 - 1


def parse_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> TrainerConfig:
    """Parse and check the flags (``world_size`` defaults to torchrun's WORLD_SIZE, else 1)."""
    flags = build_parser().parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return make_config(flags, world_size)


def make_config(
    flags: argparse.Namespace, world_size: int, tokenizer_vocab_size: Optional[int] = None
) -> TrainerConfig:
    """The trainer's configuration from parsed ``flags`` (left unchanged). ``tokenizer_vocab_size``
    defaults to the pieces of ``--tokenizer-model`` (benchmarks on synthetic ids give their own)."""
    preset = get_preset(flags.model)
    seq_length = preset.seq_length if flags.seq_length is None else flags.seq_length
    recompute = flags.recompute_granularity or preset.layout.recompute
    tp, pp = flags.tensor_model_parallel_size, flags.pipeline_model_parallel_size
    for name in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "micro_batch_size",
        "global_batch_size",
        "patch_size",
        "log_interval",
    ):
        if getattr(flags, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} {getattr(flags, name)} must be >= 1")
    if seq_length < 1:
        raise ArgumentError(f"--seq-length {seq_length} must be >= 1")
    if flags.patch_size > 1 and flags.stage != "token" and seq_length < 2:
        raise ArgumentError(
            f"--seq-length {seq_length} with --patch-size {flags.patch_size}: a patch-stage sample of one patch has "
            f"no next patch to score (every target masked, zero gradient): use --seq-length >= 2 (T, in patches)"
        )
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(flags, name) < 1.0:
            raise ArgumentError(f"--{name.replace('_', '-')} {getattr(flags, name)} must lie in [0, 1)")
    if world_size % (tp * pp):
        raise ArgumentError(
            f"world size {world_size} is not a multiple of TP x PP = {tp * pp}: launch a multiple "
            f"of {tp * pp} processes or change --tensor/--pipeline-model-parallel-size"
        )
    check_layout(preset, tp, pp, where=f"--model {preset.name}")
    virtual = resolve_virtual_pipeline(
        preset.num_layers,
        pp,
        flags.virtual_pipeline_model_parallel_size,
        flags.num_layers_per_virtual_pipeline_stage,
        f" of --model {preset.name}",
    )
    dp = world_size // (tp * pp)
    _check_flag_combinations(flags, seq_length)
    _check_optimizer_and_data_flags(flags)
    _check_summary_json(flags.summary_json)
    _check_tensorboard_dir(flags.tensorboard_dir)
    transformer_impl = resolve_transformer_impl(flags.transformer_impl)
    if transformer_impl == "transformer_engine" and flags.sdpa_backend != "auto":
        raise ArgumentError(
            f"--sdpa-backend {flags.sdpa_backend} is for the local layers' SDPA attention, and the model is built "
            f"with Transformer Engine (--transformer-impl {flags.transformer_impl}), whose attention picks its own "
            f"kernel: drop --sdpa-backend or add --transformer-impl local"
        )
    plan = make_plan(
        patch_size=flags.patch_size,
        patch_data_fraction=flags.patch_data_fraction,
        stages=flags.stage,
        seq_length=seq_length,
        micro_batch_size=flags.micro_batch_size,
        global_batch_size=flags.global_batch_size,
        data_parallel_size=dp,
        eval_iters=flags.eval_iters,
        train_iters=flags.train_iters,
        train_tokens=flags.train_tokens,
        stage_split=flags.stage_split,
    )
    if virtual is not None:
        _check_interleaved_microbatches(plan, pp, _virtual_flag(flags, virtual))
    _warn_warmup_beyond_stages(plan, flags.lr_warmup_iters)
    vocab_sha256 = None  # recorded in checkpoints: the tools check the tokenizer they are given against it
    if tokenizer_vocab_size is None:
        tokenizer = _load_tokenizer(flags.tokenizer_model)
        tokenizer_vocab_size, vocab_sha256 = tokenizer.vocab_size, tokenizer.vocab_sha256
    model = ModelSettings(
        preset=preset,
        seq_length=seq_length,
        padded_vocab_size=padded_vocab_size(tokenizer_vocab_size, flags.make_vocab_size_divisible_by, tp),
        tensor_parallel=tp,
        pipeline_parallel=pp,
        virtual_pipeline_parallel=virtual,
        sequence_parallel=flags.sequence_parallel,
        bf16=flags.bf16,
        recompute=recompute,
        transformer_impl=transformer_impl,  # auto resolved; the checkpoint records the flag as given
        bias_swiglu_fusion=flags.bias_swiglu_fusion,
        rope_fusion=flags.rope_fusion,
        cross_entropy_fusion=flags.cross_entropy_fusion,
        sdpa_backend=flags.sdpa_backend,
        hidden_dropout=flags.hidden_dropout,
        attention_dropout=flags.attention_dropout,
    )
    profile = _profile_settings(flags, world_size, plan)
    manual_gc_interval = _or_default(flags.manual_gc_interval, 0)
    recorded = dict(
        vars(flags),
        seq_length=seq_length,
        recompute_granularity=recompute,
        train_iters=plan.train_iters,
        world_size=world_size,
        data_parallel_size=dp,
        virtual_pipeline_model_parallel_size=virtual,
        tokenizer_vocab_sha256=vocab_sha256,
        manual_gc_interval=manual_gc_interval,
        profile_step_start=_or_default(flags.profile_step_start, PROFILE_STEP_START),
        profile_step_end=_or_default(flags.profile_step_end, PROFILE_STEP_END),
        profile_ranks=_or_default(flags.profile_ranks, list(PROFILE_RANKS)),
    )
    return TrainerConfig(
        flags=recorded,
        plan=plan,
        model=model,
        optimizer=OptimizerSettings(
            lr=flags.lr,
            min_lr=flags.min_lr,
            warmup_iters=flags.lr_warmup_iters,
            decay_style=flags.lr_decay_style,
            weight_decay=flags.weight_decay,
            clip_grad=flags.clip_grad,
            adam_beta1=flags.adam_beta1,
            adam_beta2=flags.adam_beta2,
            adam_eps=flags.adam_eps,
            torch_adam_impl=flags.torch_adam_impl,
            bf16=flags.bf16,
            distributed=flags.use_distributed_optimizer,
        ),
        data=DataSettings(
            data_path=tuple(flags.data_path),
            split=flags.split,
            tokenizer_model=flags.tokenizer_model,
            cache_dir=flags.data_cache_path,
            num_workers=flags.num_workers,
        ),
        checkpoints=CheckpointSettings(
            save=flags.save,
            load=flags.load,
            save_interval=flags.save_interval,
            keep_last=flags.keep_last_checkpoints,
            pretrained_checkpoint=flags.pretrained_checkpoint,
            verify=flags.checkpoint_verify,
            exit_signals=_exit_signals(flags.exit_signal),
            exit_duration_minutes=flags.exit_duration_in_mins,
            fully_parallel_save=flags.ckpt_fully_parallel_save,
            fully_parallel_load=flags.ckpt_fully_parallel_load,
            async_save=flags.async_save,
            lock_wait_seconds=flags.save_lock_wait,
        ),
        logging=LogSettings(
            log_interval=flags.log_interval,
            eval_interval=flags.eval_interval,
            tensorboard_dir=flags.tensorboard_dir,
            summary_json=flags.summary_json,
            wandb_project=flags.wandb_project,
            wandb_exp_name=flags.wandb_exp_name,
            wandb_save_dir=flags.wandb_save_dir,
        ),
        cpu=flags.cpu,
        seed=flags.seed,
        overlap_grad_reduce=flags.overlap_grad_reduce,
        overlap_param_gather=flags.overlap_param_gather,
        profile=profile,
        manual_gc_interval=manual_gc_interval if flags.manual_gc else None,
    )


def _or_default(value, default):
    """A flag whose default is None (so that a value the user gives can be told apart): its value."""
    return default if value is None else value


def _profile_settings(flags, world_size: int, plan) -> Optional[ProfileSettings]:
    if not flags.profile:
        return None
    start = _or_default(flags.profile_step_start, PROFILE_STEP_START)
    end = _or_default(flags.profile_step_end, PROFILE_STEP_END)
    ranks = _or_default(flags.profile_ranks, PROFILE_RANKS)
    if not 1 <= start < end:
        raise ArgumentError(f"--profile-step-start {start} / --profile-step-end {end}: need 1 <= start < end")
    outside = [rank for rank in ranks if not 0 <= rank < world_size]
    if outside:
        raise ArgumentError(f"--profile-ranks {outside[0]} is not a rank of this run's {world_size} processes")
    folder = flags.profile_dir or (os.path.join(flags.save, "profile") if flags.save else None)
    if not folder:
        raise ArgumentError("--profile needs --profile-dir DIR (or --save DIR: the traces go to <--save>/profile)")
    first, last = plan.stages[0].first_iteration + 1, plan.stage_ends[-1]
    if (end <= first or start > last) and rank() == 0:  # a resume may have passed it: said, not refused
        logger.warning(
            "--profile-step-start %d / --profile-step-end %d lie outside this job's iterations %d-%d: nothing is "
            "profiled; pick a window inside them",
            start,
            end,
            first,
            last,
        )
    return ProfileSettings(start, end, tuple(sorted(set(ranks))), folder)


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


def _check_tensorboard_dir(path: Optional[str]) -> None:
    """``--tensorboard-dir`` is created once the model is built: a file in its place, or a folder
    that could not be created or written, is refused now."""
    if path:
        _check_creatable("--tensorboard-dir", path, os.path.abspath(path), "a folder")


def _check_creatable(flag: str, path: str, folder: str, what: str) -> None:
    """ArgumentError unless ``folder`` (``path``'s, created when missing) is or can be a folder
    this process writes to: the nearest part of it that exists is a writable folder."""
    existing = nearest_existing(folder)
    if not os.path.isdir(existing):
        raise ArgumentError(f"{flag} {path}: {existing} on its path is a file: name {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(f"{flag} {path}: {existing} is not writable: name {what} you can write to")


def _warn_warmup_beyond_stages(plan, warmup_iters: int) -> None:
    """Each stage restarts the LR warm-up; the scheduler clamps a longer warm-up to the stage, which
    then warms up from start to end and never decays: said once, on rank 0."""
    if rank() != 0:
        return
    for stage in plan.stages:
        if warmup_iters >= stage.iterations:
            steps = f"{stage.iterations} iteration{'' if stage.iterations == 1 else 's'}"
            logger.warning(
                "--lr-warmup-iters %d is not less than the %s stage's %s: its LR warms up over the whole stage "
                "and never decays (each stage restarts the warm-up); a new run with --lr-warmup-iters below %d decays",
                warmup_iters,
                stage.name,
                steps,
                stage.iterations,
            )


def _exit_signals(text: str):
    try:
        return parse_signals(text)
    except ValueError as error:
        raise ArgumentError(str(error)) from None


def _virtual_flag(flags: argparse.Namespace, virtual: int) -> str:
    """The virtual-pipeline flag as given, for messages."""
    if flags.num_layers_per_virtual_pipeline_stage is not None:
        return f"--num-layers-per-virtual-pipeline-stage {flags.num_layers_per_virtual_pipeline_stage} (V={virtual})"
    return f"--virtual-pipeline-model-parallel-size {virtual}"


def _check_interleaved_microbatches(plan, pp: int, virtual_flag: str) -> None:
    """megatron's interleaved schedule runs a step's micro-batches in groups of PP: in every stage
    (validation too) they must be a multiple of PP."""
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


def _load_tokenizer(path: str):
    from megatron_patch.data.tokenizer import SentencePieceTokenizer

    if not os.path.isfile(path):
        raise ArgumentError(f"--tokenizer-model {path}: no such file (train one with tools/train_tokenizer.py)")
    return SentencePieceTokenizer(path)  # DataError (one line) when not a SentencePiece model


def _check_optimizer_and_data_flags(flags: argparse.Namespace) -> None:
    """One-line errors for optimizer and data flags out of range (else torch or megatron fails later,
    with a traceback)."""
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
    if not 0 <= flags.seed < SEED_LIMIT:
        raise ArgumentError(f"--seed {flags.seed} must lie in [0, {SEED_LIMIT - 1}] (numpy's range; default 1234)")


def _check_flag_combinations(flags: argparse.Namespace, seq_length: int) -> None:
    """One-line errors for flags that contradict each other (batch and budget: ``plan.make_plan``)."""
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
