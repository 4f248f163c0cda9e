"""Command-line flags with Megatron's names, plus the flags patch training adds.

``parse_args`` checks the flags against each other and the world size (one-line ``ArgumentError``
saying what to change) and turns them into a frozen :class:`~megatron_patch.training.config.TrainerConfig`:
the run plan (every batch, shape and step count) and one settings object per concern. Nothing is
written back onto the parsed flags.
"""

import argparse
import math
import os
from typing import List, Optional

from megatron_patch.architecture.build import ModelSettings, padded_vocab_size
from megatron_patch.architecture.presets import PRESETS, get_preset
from megatron_patch.errors import ArgumentError, DataError
from megatron_patch.runtime.command import ArgumentParser
from megatron_patch.runtime.parallel import resolve_virtual_pipeline
from megatron_patch.training.config import (
    CheckpointSettings,
    DataSettings,
    LogSettings,
    OptimizerSettings,
    TrainerConfig,
)
from megatron_patch.training.plan import make_plan
from megatron_patch.training.preemption import DEFAULT_SIGNALS, parse_signals


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="pretrain_patch_gpt",
        description="Patch-level then token-level pre-training of a GPT on Megatron-Core.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, choices=sorted(PRESETS), help="model preset")
    model.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="T, positions the model sees (tokens in the token stage, patches in the "
        "patch stage); default: the preset's",
    )
    model.add_argument(
        "--transformer-impl",
        choices=["auto", "local", "transformer_engine"],
        default="auto",
        help="layer implementation: TE when it imports (auto), or megatron's local spec with SDPA",
    )
    model.add_argument(
        "--recompute-granularity",
        choices=["none", "selective", "full"],
        default=None,
        help="activation recompute; default: the preset's layout",
    )
    model.add_argument(
        "--bias-swiglu-fusion",
        action="store_true",
        help="megatron's fused SwiGLU (torch.compile'd; saves only the MLP input for backward)",
    )
    model.add_argument(
        "--rope-fusion",
        action="store_true",
        help="apply RoPE inside the SDPA core attention as one torch.compile'd kernel "
        "instead of megatron's unfused RoPE (local spec; same model and checkpoints)",
    )
    model.add_argument(
        "--cross-entropy-fusion",
        action="store_true",
        help="score both stages with the K-way cross-entropy that keeps the bf16 logits "
        "instead of an fp32 softmax buffer and reads them in fewer, torch.compile'd "
        "passes (the token stage then leaves megatron's CE: equal within rounding, "
        "not bit for bit)",
    )
    model.add_argument(
        "--hidden-dropout",
        type=float,
        default=0.0,
        help="dropout after attention and MLP (and on the embeddings), as in Megatron; the presets use none",
    )
    model.add_argument(
        "--attention-dropout",
        type=float,
        default=0.0,
        help="dropout on the attention probabilities, as in Megatron; the presets use none",
    )

    patch = parser.add_argument_group("patch-level training")
    patch.add_argument("--patch-size", type=int, default=4, help="K, tokens per patch (1 = token-only training)")
    patch.add_argument(
        "--patch-data-fraction",
        type=float,
        default=2 / 3,
        help="lambda, the fraction of the training tokens trained at patch level",
    )
    patch.add_argument(
        "--stage", choices=["both", "patch", "token"], default="both", help="run both stages in one job, or one of them"
    )
    patch.add_argument(
        "--stage-split",
        choices=["documents", "epochs"],
        default="documents",
        help="documents: the patch stage reads the documents holding the first lambda of the "
        "training tokens, the token stage the rest (one pass, no repeat); epochs: both stages "
        "read all training documents, the patch stage for the first lambda of the budget, "
        "the token stage for the rest (the paper's multi-epoch recipe; budget >= one pass)",
    )
    patch.add_argument(
        "--pretrained-checkpoint",
        default=None,
        help="--stage token: initialise the weights (only) from this checkpoint",
    )

    par = parser.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    virtual = par.add_mutually_exclusive_group()
    virtual.add_argument(
        "--virtual-pipeline-model-parallel-size",
        type=int,
        default=None,
        metavar="V",
        help="V: interleave the pipeline (megatron's interleaved 1F1B schedule), V model chunks of "
        "L/(PP*V) layers per pipeline rank; needs PP > 1, PP*V dividing the layers and, in both "
        "stages, micro-batches per step (G/(b*DP), G/(K*b*DP) in the patch stage) a multiple of PP",
    )
    virtual.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        metavar="N",
        help="or give N, the layers of one virtual stage (model chunk): V = L / (PP * N)",
    )
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    par.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="overlap the data-parallel gradient all-reduce (reduce-scatter with "
        "--use-distributed-optimizer) with the backward of the last micro-batch, "
        "bucket by bucket (megatron DDP); the same gradients",
    )
    par.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="with --use-distributed-optimizer and --overlap-grad-reduce: all-gather the "
        "updated weights bucket by bucket during the next forward instead of after "
        "the optimizer step (megatron DDP); the same weights",
    )
    par.add_argument("--cpu", action="store_true", help="CPU mode over gloo (tests, quick start)")

    batch = parser.add_argument_group("batch and budget")
    batch.add_argument("--micro-batch-size", type=int, required=True, help="sequences per micro-batch, both stages")
    batch.add_argument(
        "--global-batch-size",
        type=int,
        required=True,
        help="token-stage sequences per step; the patch stage takes GBS/K sequences of "
        "K*T tokens, so both stages consume the same tokens per step",
    )
    budget = batch.add_mutually_exclusive_group(required=True)
    budget.add_argument("--train-iters", type=int, help="steps of both stages together (N)")
    budget.add_argument("--train-tokens", type=int, help="training tokens of both stages together (D)")

    opt = parser.add_argument_group("optimizer and schedule (each stage restarts them)")
    opt.add_argument("--lr", type=float, required=True)
    opt.add_argument("--min-lr", type=float, default=0.0)
    opt.add_argument("--lr-warmup-iters", type=int, default=0)
    opt.add_argument(
        "--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"], default="cosine"
    )
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--clip-grad", type=float, default=1.0)
    opt.add_argument("--adam-beta1", type=float, default=0.9)
    opt.add_argument("--adam-beta2", type=float, default=0.95)
    opt.add_argument("--adam-eps", type=float, default=1e-8)
    opt.add_argument(
        "--torch-adam-impl",
        choices=["foreach", "fused"],
        default="foreach",
        help="kernel of torch's AdamW, which megatron falls back to without Transformer Engine "
        "or Apex (their FusedAdam is used when installed, and this flag then does "
        "nothing): foreach (megatron's choice, several passes over the fp32 state) or "
        "fused (one pass)",
    )
    opt.add_argument("--bf16", action="store_true", help="bf16 parameters and compute, fp32 main weights")
    opt.add_argument("--seed", type=int, default=1234)

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-path", nargs="+", required=True, help="a .bin/.idx prefix, or a blend: weight prefix weight prefix ..."
    )
    data.add_argument("--split", default="969,30,1", help="train,valid,test shares of the documents")
    data.add_argument("--tokenizer-model", required=True, help="SentencePiece .model")
    data.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    data.add_argument("--data-cache-path", default=None, help="where megatron caches dataset indices")
    data.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--save", default=None, help="checkpoint directory")
    ckpt.add_argument("--load", default=None, help="resume from the latest checkpoint in this directory")
    ckpt.add_argument("--save-interval", type=int, default=None, help="steps between checkpoints")
    ckpt.add_argument("--keep-last-checkpoints", type=int, default=2, help="checkpoints kept (0 = all)")
    ckpt.add_argument(
        "--no-checkpoint-verify",
        dest="checkpoint_verify",
        action="store_false",
        help="load without checking every file against the checkpoint's manifest (sizes, CRC-32)",
    )
    ckpt.add_argument(
        "--exit-signal",
        default=DEFAULT_SIGNALS,
        help="signals that save a checkpoint at the current step and exit 0 (comma list; "
        "SLURM: --signal=USR1@90 sends SIGUSR1 ahead of the time limit)",
    )

    log = parser.add_argument_group("logging and evaluation")
    log.add_argument("--log-interval", type=int, default=10)
    log.add_argument("--eval-interval", type=int, default=None, help="steps between validations")
    log.add_argument("--eval-iters", type=int, default=10, help="global batches per validation (0: none)")
    log.add_argument("--tensorboard-dir", default=None)
    log.add_argument("--summary-json", default=None, help="also write the final summary here (JSON)")
    log.add_argument(
        "--wandb-project",
        default=None,
        help="log to this Weights & Biases project (pip install -e .[wandb]; "
        "offline without an API key or with WANDB_MODE=offline)",
    )
    log.add_argument("--wandb-exp-name", default=None, help="the W&B run's name (needed with --wandb-project)")
    log.add_argument("--wandb-save-dir", default=None, help="where W&B keeps the run's files (default: <--save>/wandb)")
    return parser


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
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(flags, name) < 1.0:
            raise ArgumentError(f"--{name.replace('_', '-')} {getattr(flags, name)} must lie in [0, 1)")
    if world_size % (tp * pp):
        raise ArgumentError(
            f"world size {world_size} is not a multiple of TP x PP = {tp * pp}: launch a multiple "
            f"of {tp * pp} processes or change --tensor/--pipeline-model-parallel-size"
        )
    _check_layout_fits_preset(preset, tp, pp)
    virtual = resolve_virtual_pipeline(
        preset.num_layers,
        pp,
        flags.virtual_pipeline_model_parallel_size,
        flags.num_layers_per_virtual_pipeline_stage,
        f" of --model {preset.name}",
    )
    dp = world_size // (tp * pp)
    _check_flag_combinations(flags, seq_length)
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
    if tokenizer_vocab_size is None:
        tokenizer_vocab_size = _tokenizer_vocab_size(flags.tokenizer_model)
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
        transformer_impl=flags.transformer_impl,
        bias_swiglu_fusion=flags.bias_swiglu_fusion,
        rope_fusion=flags.rope_fusion,
        cross_entropy_fusion=flags.cross_entropy_fusion,
        hidden_dropout=flags.hidden_dropout,
        attention_dropout=flags.attention_dropout,
    )
    recorded = dict(
        vars(flags),
        seq_length=seq_length,
        recompute_granularity=recompute,
        train_iters=plan.train_iters,
        world_size=world_size,
        data_parallel_size=dp,
        virtual_pipeline_model_parallel_size=virtual,
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
    )


def _exit_signals(text: str):
    try:
        return parse_signals(text)
    except ValueError as error:
        raise ArgumentError(str(error)) from None


def _check_layout_fits_preset(preset, tp: int, pp: int) -> None:
    heads, groups = preset.num_attention_heads, preset.num_query_groups or preset.num_attention_heads
    if heads % tp or groups % tp:
        raise ArgumentError(
            f"--tensor-model-parallel-size {tp} does not divide the {heads} attention heads "
            f"({groups} groups) of --model {preset.name}: pick a divisor"
        )
    if preset.num_layers % pp:
        raise ArgumentError(
            f"--pipeline-model-parallel-size {pp} does not divide the {preset.num_layers} layers "
            f"of --model {preset.name}: pick a divisor"
        )


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


def _tokenizer_vocab_size(path: str) -> int:
    from megatron_patch.data.tokenizer import SentencePieceTokenizer

    if not os.path.isfile(path):
        raise ArgumentError(f"--tokenizer-model {path}: no such file (train one with tools/train_tokenizer.py)")
    try:
        return SentencePieceTokenizer(path).vocab_size
    except ValueError as error:
        raise DataError(str(error)) from None


def _check_flag_combinations(flags: argparse.Namespace, seq_length: int) -> None:
    """One-line errors for flags that contradict each other (batch and budget: ``plan.make_plan``)."""
    tp = flags.tensor_model_parallel_size
    if flags.rope_fusion and flags.transformer_impl == "transformer_engine":
        raise ArgumentError(
            "--rope-fusion is for --transformer-impl local (Transformer Engine fuses RoPE itself): drop one"
        )
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
    if flags.pretrained_checkpoint and flags.load:
        raise ArgumentError("give --load (resume) or --pretrained-checkpoint (fresh token stage), not both")
    if flags.wandb_project is not None and not flags.wandb_exp_name:
        raise ArgumentError(f"--wandb-project {flags.wandb_project} needs --wandb-exp-name: name the run")
    if flags.save_interval is not None and flags.save_interval < 1:
        raise ArgumentError(f"--save-interval {flags.save_interval} must be >= 1")
    if flags.save_interval and not flags.save:
        raise ArgumentError("--save-interval needs --save DIR")
    if flags.eval_iters < 0:
        raise ArgumentError(f"--eval-iters {flags.eval_iters} must be >= 0 (0 turns validation off)")
    if flags.eval_interval is not None and flags.eval_interval < 1:
        raise ArgumentError(f"--eval-interval {flags.eval_interval} must be >= 1")
    if flags.keep_last_checkpoints < 0:
        raise ArgumentError(f"--keep-last-checkpoints {flags.keep_last_checkpoints} must be >= 0")
    if flags.lr <= 0 or flags.min_lr < 0 or flags.min_lr > flags.lr:
        raise ArgumentError(f"--lr {flags.lr} / --min-lr {flags.min_lr}: need 0 <= min-lr <= lr and lr > 0")
    if flags.lr_warmup_iters < 0:
        raise ArgumentError(f"--lr-warmup-iters {flags.lr_warmup_iters} must be >= 0")
    if not math.isfinite(flags.clip_grad) or flags.clip_grad < 0:
        raise ArgumentError(f"--clip-grad {flags.clip_grad} must be >= 0 (0 disables clipping)")
    if flags.data_path and len(flags.data_path) > 1 and len(flags.data_path) % 2:
        raise ArgumentError(f"--data-path takes one prefix or weight/prefix pairs; got {len(flags.data_path)} values")
    if flags.pretrained_checkpoint and not os.path.isdir(flags.pretrained_checkpoint):
        raise ArgumentError(f"--pretrained-checkpoint {flags.pretrained_checkpoint}: no such directory")
