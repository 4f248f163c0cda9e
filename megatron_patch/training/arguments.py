"""Command-line arguments with Megatron's flag names, plus the flags patch training adds.

``parse_args`` validates flag combinations against each other and the world size and raises
``ArgumentError`` with a one-line message that says what to change.
"""

import argparse
import math
import os
from typing import List, Optional

from megatron_patch.architecture.presets import PRESETS, get_preset


class ArgumentError(ValueError):
    """A bad flag or flag combination (reported as one line, exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_patch_gpt",
        description="Patch-level then token-level pre-training of a GPT on Megatron-Core.",
        allow_abbrev=False,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, choices=sorted(PRESETS), help="model preset")
    model.add_argument("--seq-length", type=int, default=None,
                       help="T, positions the model sees (tokens in the token stage, patches in the "
                            "patch stage); default: the preset's")
    model.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default="auto",
                       help="layer implementation: TE when it imports (auto), or megatron's local spec with SDPA")
    model.add_argument("--recompute-granularity", choices=["none", "selective", "full"], default=None,
                       help="activation recompute; default: the preset's layout")
    model.add_argument("--bias-swiglu-fusion", action="store_true",
                       help="megatron's fused SwiGLU (torch.compile'd; saves only the MLP input for "
                            "backward); off by default until measured on GPU (benchmarks/RESULTS.md)")
    model.add_argument("--rope-fusion", action="store_true",
                       help="apply RoPE inside the SDPA core attention as one torch.compile'd kernel "
                            "instead of megatron's unfused RoPE (local spec; same model and checkpoints); "
                            "off by default until measured on GPU (benchmarks/RESULTS.md)")
    model.add_argument("--cross-entropy-fusion", action="store_true",
                       help="score both stages with the K-way cross-entropy that keeps the bf16 logits "
                            "instead of an fp32 softmax buffer and reads them in fewer, torch.compile'd "
                            "passes (the token stage then leaves megatron's CE: equal within rounding, "
                            "not bit for bit); off by default until measured on GPU (benchmarks/RESULTS.md)")

    patch = parser.add_argument_group("patch-level training")
    patch.add_argument("--patch-size", type=int, default=4, help="K, tokens per patch (1 = token-only training)")
    patch.add_argument("--patch-data-fraction", type=float, default=2 / 3,
                       help="lambda, the fraction of the training tokens trained at patch level")
    patch.add_argument("--stage", choices=["both", "patch", "token"], default="both",
                       help="run both stages in one job, or one of them")
    patch.add_argument("--pretrained-checkpoint", default=None,
                       help="--stage token: initialise the weights (only) from this checkpoint")

    par = parser.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    par.add_argument("--overlap-grad-reduce", action="store_true",
                     help="overlap the data-parallel gradient all-reduce (reduce-scatter with "
                          "--use-distributed-optimizer) with the backward of the last micro-batch, "
                          "bucket by bucket (megatron DDP); the same gradients")
    par.add_argument("--overlap-param-gather", action="store_true",
                     help="with --use-distributed-optimizer and --overlap-grad-reduce: all-gather the "
                          "updated weights bucket by bucket during the next forward instead of after "
                          "the optimizer step (megatron DDP); the same weights")
    par.add_argument("--cpu", action="store_true", help="CPU mode over gloo (tests, quick start)")

    batch = parser.add_argument_group("batch and budget")
    batch.add_argument("--micro-batch-size", type=int, required=True, help="sequences per micro-batch, both stages")
    batch.add_argument("--global-batch-size", type=int, required=True,
                       help="token-stage sequences per step; the patch stage takes GBS/K sequences of "
                            "K*T tokens, so both stages consume the same tokens per step")
    budget = batch.add_mutually_exclusive_group(required=True)
    budget.add_argument("--train-iters", type=int, help="steps of both stages together (N)")
    budget.add_argument("--train-tokens", type=int, help="training tokens of both stages together (D)")

    opt = parser.add_argument_group("optimizer and schedule (each stage restarts them)")
    opt.add_argument("--lr", type=float, required=True)
    opt.add_argument("--min-lr", type=float, default=0.0)
    opt.add_argument("--lr-warmup-iters", type=int, default=0)
    opt.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"],
                     default="cosine")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--clip-grad", type=float, default=1.0)
    opt.add_argument("--adam-beta1", type=float, default=0.9)
    opt.add_argument("--adam-beta2", type=float, default=0.95)
    opt.add_argument("--adam-eps", type=float, default=1e-8)
    opt.add_argument("--torch-adam-impl", choices=["foreach", "fused"], default="foreach",
                     help="kernel of torch's AdamW, which megatron falls back to without Transformer Engine "
                          "or Apex (their FusedAdam is used when installed, and this flag then does "
                          "nothing): foreach (megatron's choice, several passes over the fp32 state) or "
                          "fused (one pass); off by default until measured on GPU (benchmarks/RESULTS.md)")
    opt.add_argument("--bf16", action="store_true", help="bf16 parameters and compute, fp32 main weights")
    opt.add_argument("--seed", type=int, default=1234)

    data = parser.add_argument_group("data")
    data.add_argument("--data-path", nargs="+", required=True,
                      help="a .bin/.idx prefix, or a blend: weight prefix weight prefix ...")
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

    log = parser.add_argument_group("logging and evaluation")
    log.add_argument("--log-interval", type=int, default=10)
    log.add_argument("--eval-interval", type=int, default=None, help="steps between validations")
    log.add_argument("--eval-iters", type=int, default=10, help="global batches per validation (0: none)")
    log.add_argument("--tensorboard-dir", default=None)
    log.add_argument("--summary-json", default=None, help="also write the final summary here (JSON)")
    return parser


def parse_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and validate; adds derived fields (data_parallel_size, stage iterations, ...)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world_size)
    return args


def _fail(message: str) -> None:
    raise ArgumentError(message)


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    preset = get_preset(args.model)
    args.seq_length = args.seq_length or preset.seq_length
    if args.recompute_granularity is None:
        args.recompute_granularity = preset.layout.recompute
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                 "global_batch_size", "seq_length", "patch_size", "log_interval"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if world_size % (tp * pp):
        _fail(f"world size {world_size} is not a multiple of TP x PP = {tp * pp}: launch "
              f"a multiple of {tp * pp} processes or change --tensor/--pipeline-model-parallel-size")
    args.world_size = world_size
    args.data_parallel_size = dp = world_size // (tp * pp)
    if args.rope_fusion and args.transformer_impl == "transformer_engine":
        _fail("--rope-fusion is for --transformer-impl local (Transformer Engine fuses RoPE itself): drop one")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        _fail("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce: add them")
    if args.sequence_parallel and tp == 1:
        _fail("--sequence-parallel needs --tensor-model-parallel-size > 1: drop the flag")
    if args.sequence_parallel and args.seq_length % tp:
        _fail(f"--sequence-parallel: --seq-length {args.seq_length} must be divisible by "
              f"--tensor-model-parallel-size {tp} (each rank holds whole patches)")

    K = args.patch_size
    if K == 1 and args.stage == "patch":
        _fail("--stage patch needs --patch-size > 1 (K=1 is token-level training)")
    if K > 1 and not 0.0 < args.patch_data_fraction < 1.0:
        _fail(f"--patch-data-fraction {args.patch_data_fraction} must lie in (0, 1); the paper uses 2/3")
    if args.pretrained_checkpoint and args.stage != "token":
        _fail("--pretrained-checkpoint is for --stage token (the patch stage starts from scratch)")
    if args.pretrained_checkpoint and args.load:
        _fail("give --load (resume) or --pretrained-checkpoint (fresh token stage), not both")

    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        _fail(f"--global-batch-size {args.global_batch_size} is not a multiple of micro-batch x "
              f"data-parallel = {args.micro_batch_size} x {dp}: make it one")
    if K > 1 and args.global_batch_size % (K * per_step):
        _fail(f"--global-batch-size {args.global_batch_size} must be a multiple of K x micro-batch x "
              f"data-parallel = {K} x {args.micro_batch_size} x {dp}, so the patch stage "
              f"(GBS/K sequences of K*T tokens) keeps the token stage's tokens per step")

    tokens_per_step = args.global_batch_size * args.seq_length
    if args.train_tokens is not None:
        if args.train_tokens < tokens_per_step:
            _fail(f"--train-tokens {args.train_tokens} is less than one step ({tokens_per_step} tokens)")
        args.train_iters = args.train_tokens // tokens_per_step
    if args.train_iters < 1:
        _fail(f"--train-iters {args.train_iters} must be >= 1")
    # the same budget split whichever stage runs: lambda*N patch steps, the rest token steps
    args.patch_iters = round(args.patch_data_fraction * args.train_iters) if K > 1 else 0
    args.token_iters = args.train_iters - args.patch_iters
    if K > 1 and (args.patch_iters == 0 or args.token_iters == 0):
        _fail(f"--train-iters {args.train_iters} with lambda={args.patch_data_fraction:.3f} leaves a stage "
              f"with no steps: train longer")
    args.tokens_per_step = tokens_per_step

    if args.save_interval is not None and args.save_interval < 1:
        _fail(f"--save-interval {args.save_interval} must be >= 1")
    if args.save_interval and not args.save:
        _fail("--save-interval needs --save DIR")
    if args.eval_iters < 0:
        _fail(f"--eval-iters {args.eval_iters} must be >= 0 (0 turns validation off)")
    if args.eval_interval is not None and args.eval_interval < 1:
        _fail(f"--eval-interval {args.eval_interval} must be >= 1")
    if args.keep_last_checkpoints < 0:
        _fail(f"--keep-last-checkpoints {args.keep_last_checkpoints} must be >= 0")
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        _fail(f"--lr {args.lr} / --min-lr {args.min_lr}: need 0 <= min-lr <= lr and lr > 0")
    if args.lr_warmup_iters < 0:
        _fail(f"--lr-warmup-iters {args.lr_warmup_iters} must be >= 0")
    if not math.isfinite(args.clip_grad) or args.clip_grad < 0:
        _fail(f"--clip-grad {args.clip_grad} must be >= 0 (0 disables clipping)")
    if args.data_path and len(args.data_path) > 1 and len(args.data_path) % 2:
        _fail(f"--data-path takes one prefix or weight/prefix pairs; got {len(args.data_path)} values")
    if not os.path.isfile(args.tokenizer_model):
        _fail(f"--tokenizer-model {args.tokenizer_model}: no such file (train one with tools/train_tokenizer.py)")
    for path_flag in ("load", "pretrained_checkpoint"):
        path = getattr(args, path_flag)
        if path and not os.path.isdir(path):
            _fail(f"--{path_flag.replace('_', '-')} {path}: no such directory")
