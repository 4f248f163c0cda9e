"""The trainer's flags (:mod:`~megatron_patch.training.flags`) turned into its configuration.

``parse_args`` checks the flags against each other and the world size (one-line ``ArgumentError``
saying what to change) and turns them into a frozen :class:`~megatron_patch.training.config.TrainerConfig`:
the run plan (every batch, shape and step count) and one settings object per concern. Nothing is
written back onto the parsed flags.
"""

import argparse
import logging
import os
from typing import List, Optional

from megatron_patch.architecture.build import ModelSettings, padded_vocab_size
from megatron_patch.architecture.presets import check_layout, get_preset
from megatron_patch.architecture.specs import resolve_transformer_impl
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
from megatron_patch.training.flag_checks import (
    check_flag_combinations,
    check_flag_ranges,
    check_interleaved_microbatches,
    check_output_paths,
)
from megatron_patch.training.flags import PROFILE_RANKS, PROFILE_STEP_END, PROFILE_STEP_START, build_parser
from megatron_patch.training.plan import make_plan
from megatron_patch.training.preemption import parse_signals

logger = logging.getLogger(__name__)


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
    check_flag_combinations(flags, seq_length)
    check_flag_ranges(flags)
    check_output_paths(flags)
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
        check_interleaved_microbatches(plan, pp, flags, virtual)
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


def _load_tokenizer(path: str):
    from megatron_patch.data.tokenizer import SentencePieceTokenizer

    if not os.path.isfile(path):
        raise ArgumentError(f"--tokenizer-model {path}: no such file (train one with tools/train_tokenizer.py)")
    return SentencePieceTokenizer(path)  # DataError (one line) when not a SentencePiece model
