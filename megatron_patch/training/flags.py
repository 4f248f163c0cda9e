"""The trainer's command line: Megatron's flag names, plus the flags patch training adds, in one
parser (``build_parser``). :mod:`~megatron_patch.training.arguments` checks what it parses and turns
it into the trainer's configuration.
"""

import decimal

from megatron_patch.architecture.attention import SDPA_BACKEND_CHOICES
from megatron_patch.architecture.presets import PRESETS
from megatron_patch.runtime.command import ArgumentParser, add_checkpoint_verify_flag
from megatron_patch.training.preemption import DEFAULT_SIGNALS

# --save-lock-wait's default: longer than NFSv4's default lease (90 s) and Lustre's usual eviction of a
# failed client, so a job requeued at once after a node failure finds the failed node's lock released
SAVE_LOCK_WAIT_S = 300.0

# --profile's window and ranks when not given (Megatron-LM's defaults)
PROFILE_STEP_START = 10
PROFILE_STEP_END = 12
PROFILE_RANKS = (0,)


def token_count(text: str) -> int:
    """A whole number of tokens, also written as ``360e9`` or ``360_000_000_000`` (argparse type)."""
    try:
        value = decimal.Decimal(text.strip().replace("_", ""))
    except decimal.InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value != value.to_integral_value() or abs(value) > 2**62:
        raise ValueError(text)  # argparse: "invalid token_count value: TEXT"
    return int(value)


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
        "instead of megatron's unfused RoPE (local spec; with Transformer Engine, megatron's apply_rope_fusion; "
        "same model and checkpoints)",
    )
    model.add_argument(
        "--sdpa-backend",
        choices=SDPA_BACKEND_CHOICES,
        default="auto",
        help="the attention kernel SDPA tries first, the others after it in torch's order (local layers): "
        "auto keeps torch's order, which tries flash attention first and cuDNN's last; cuDNN's is reported "
        "faster on Hopper GPUs (same model and checkpoints)",
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
        help="--stage token: initialise the weights (only) from the patch stage's last checkpoint or the "
        "conversion tool's output; with --load too, --load wins once it holds a checkpoint (a requeued job resumes)",
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
    budget.add_argument(
        "--train-tokens", type=token_count, help="training tokens of both stages together (D; e.g. 360e9)"
    )

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
    opt.add_argument("--seed", type=int, default=1234, help="0 to 2**32 - 1 (numpy's range)")

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
    add_checkpoint_verify_flag(ckpt)
    ckpt.add_argument(
        "--ckpt-fully-parallel-save",
        action="store_true",
        default=True,
        help="the data-parallel replicas share the writing of replicated shards, each shard written "
        "once (the default, as in Megatron-LM)",
    )
    ckpt.add_argument(
        "--no-ckpt-fully-parallel-save",
        dest="ckpt_fully_parallel_save",
        action="store_false",
        help="the first data-parallel replica writes every replicated shard while the others wait",
    )
    ckpt.add_argument(
        "--ckpt-fully-parallel-load",
        action="store_true",
        help="each data-parallel replica reads a share of the replicated shards and receives the rest "
        "from the others (fewer reads of the file system; exchanges them over the network)",
    )
    ckpt.add_argument(
        "--async-save",
        action="store_true",
        help="write each interval's checkpoint in a forked process while training goes on (as Megatron-LM's); "
        "it is completed at a later step once every rank's writer has ended; saves at a stop or the "
        "end of the run stay synchronous",
    )
    ckpt.add_argument(
        "--save-lock-wait",
        type=float,
        default=SAVE_LOCK_WAIT_S,
        metavar="SECONDS",
        help="how long to wait for the --save folder's lock when another host holds it (a failed node keeps it "
        "until the file system's lease runs out; 0: refuse at once; a stop signal ends the wait); a holder on this "
        "host is refused at once "
        "(default: %(default).0f)",
    )
    ckpt.add_argument(
        "--exit-signal",
        default=DEFAULT_SIGNALS,
        help="signals that save a checkpoint at the current step and exit 0 (comma list; "
        "SLURM: --signal=USR1@90 sends SIGUSR1 ahead of the time limit); without --save none is taken",
    )
    ckpt.add_argument(
        "--exit-duration-in-mins",
        type=float,
        default=None,
        help="save a checkpoint and exit 0 after the first step that ends this many minutes after the "
        "trainer started (a job time limit with no warning signal: leave time for a step and a save)",
    )

    log = parser.add_argument_group("logging and evaluation")
    log.add_argument("--log-interval", type=int, default=10)
    log.add_argument(
        "--eval-interval",
        type=int,
        default=None,
        help="steps between validations (needs --eval-iters > 0; default: at the end of each stage only)",
    )
    log.add_argument("--eval-iters", type=int, default=10, help="global batches per validation (0: none)")
    log.add_argument("--tensorboard-dir", default=None)
    log.add_argument(
        "--summary-json",
        default=None,
        help="also write the final summary here (JSON; its folder is created if missing)",
    )
    log.add_argument(
        "--wandb-project",
        default=None,
        help="log to this Weights & Biases project (pip install -e .[wandb]; "
        "offline without an API key or with WANDB_MODE=offline)",
    )
    log.add_argument("--wandb-exp-name", default=None, help="the W&B run's name (needed with --wandb-project)")
    log.add_argument(
        "--wandb-save-dir",
        default=None,
        help="where W&B keeps the run's files (default: <--save>/wandb, or ./wandb without --save)",
    )
    log.add_argument(
        "--manual-gc",
        action="store_true",
        help="turn Python's automatic garbage collection off during training and collect at the same steps "
        "on every rank (avoids one rank's collection pause stalling the others)",
    )
    log.add_argument(
        "--manual-gc-interval",
        type=int,
        default=None,  # None: not given (refused without --manual-gc); resolved to 0 in arguments.py
        help="with --manual-gc: steps between collections (0, the default: start only)",
    )
    log.add_argument(
        "--profile",
        action="store_true",
        help="write a torch.profiler trace (Chrome format) of steps [--profile-step-start, --profile-step-end) "
        "and log the operators with the most self time",
    )
    # default None: not given (refused without --profile); resolved to the PROFILE_* defaults in arguments.py
    log.add_argument(
        "--profile-step-start",
        type=int,
        default=None,
        help=f"with --profile: first global iteration profiled (default {PROFILE_STEP_START})",
    )
    log.add_argument(
        "--profile-step-end",
        type=int,
        default=None,
        help=f"with --profile: first global iteration not profiled (default {PROFILE_STEP_END})",
    )
    log.add_argument(
        "--profile-ranks",
        type=int,
        nargs="+",
        default=None,
        help=f"with --profile: global ranks that profile (default {' '.join(map(str, PROFILE_RANKS))})",
    )
    log.add_argument(
        "--profile-dir", default=None, help="with --profile: where the traces go (default: <--save>/profile)"
    )
    return parser
