"""The GPU campaign's flags (``gpu_campaign.py``): the parts and their time budgets, the throughput
levers and runs, the activation runs, the sizes of the GPU and of the CPU rehearsal, and the
checks that turn a bad combination into one ``error:`` line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import List

from campaign_corpus import MANIFEST
from common import positive_int_list

from megatron_patch.errors import ArgumentError
from megatron_patch.runtime.command import ArgumentParser

# the first line of gpu_campaign.py's docstring, its --help description
DESCRIPTION = "The GPU campaign of issue 16: one entry point that turns a short GPU window into the speed and"
PARTS = ("tests", "throughput", "cost", "activations")
# seconds; the four add up to the one device call's --deadline-s (560) less the 10 s kept for the summary
# (benchmarks/README.md, "Issue 16", says why these four)
BUDGETS = {"tests": 60, "throughput": 230, "cost": 225, "activations": 35}
# the test files that hold GPU-marked tests (-m gpu): collecting only these takes seconds, where the
# five test folders took 27 s on CPU (tests/benchmarks/test_gpu_campaign.py checks the list is whole)
# In this order, which pytest keeps: the trainer's GPU test (fused Adam) and the benchmark scripts' first,
# the files whose tests compile kernels on an empty inductor cache (the fusions, fused RoPE, fused CE) last,
# so that a run stopped at the part's limit loses those
GPU_TEST_FILES = (
    "tests/training/test_trainer.py",
    "tests/benchmarks/test_benchmarks_on_gpu.py",
    "tests/unit/test_model.py",
    "tests/unit/test_rope.py",
    "tests/unit/test_fused_cross_entropy.py",
)
# cuDNN's attention first: the lever likeliest to help (SDPA tries flash attention first, and cuDNN's is
# reported faster than flash attention for training shapes on Hopper), so its single run comes first of
# the levers' runs
LEVERS = {"cudnn": ["--sdpa-backend", "cudnn"], "swiglu": ["--bias-swiglu-fusion"], "rope": ["--rope-fusion"]}
LEVERS["ce"] = ["--cross-entropy-fusion"]
LEVERS["adam"] = ["--torch-adam-impl", "fused"]
ALL_LEVERS = [flag for flags in LEVERS.values() for flag in flags]
ACCUM_RUN = "all-accum"
# the levers of each throughput run, by name. cudnn runs first, alone: its kernel is the one lever new
# to this code on a GPU, so a run-time failure of cuDNN's attention (not a shape SDPA passes over to the
# next kernel) is met once, and the later runs and the cost part leave the lever out (campaign_parts)
THROUGHPUT_RUNS = {"cudnn": ["cudnn"], ACCUM_RUN: list(LEVERS), "base": [], "all": list(LEVERS)}
# the canary: the cudnn run, first, stopped after CANARY_S x --time-scale seconds (30-45 s expected) and then
# counted as a failed lever, so that a hang or a crawl in cuDNN's attention cannot take the MFU runs' time
CANARY_RUN, CANARY_S = "cudnn", 90
THROUGHPUT_RUNS.update({name: [name] for name in LEVERS if name != "cudnn"})
# the runs at every --micro-batch-sizes value; each lever alone runs at the first only (against base
# there), since a process's start-up and compiles, not its steps, take most of a run's time
ALL_SIZES_RUNS = (ACCUM_RUN, "base", "all")
# the runs that also profile one step per stage (throughput.py --kernel-table): which attention kernel
# runs, and where the rest of a step's device time goes, without the levers and with them
KERNEL_TABLE_RUNS, KERNEL_TABLE_ROWS = ("base", "all"), 25
ACTIVATION_RUNS = {  # name: (preset, layers, recompute modes, flags)
    "370m": ("370m", None, "none,selective,full", []),
    "370m-swiglu": ("370m", None, "none", LEVERS["swiglu"]),
    "370m-all": ("370m", None, "none", LEVERS["swiglu"] + LEVERS["rope"] + LEVERS["ce"]),
    "6.7b": ("6.7b", 2, "none,selective,full", []),
    "13b": ("13b", 2, "none,selective,full", []),
}
# what the part runs unless named: the 370M re-measurements RESULTS.md asks for (6.7b and 13b were
# measured on the H100; a later window reruns them with --activations-runs 6.7b,13b)
DEFAULT_ACTIVATION_RUNS = ["370m", "370m-swiglu", "370m-all"]
COST_RUNS = ("two-stage", "token-only")  # the cost part's runs, in this order (campaign_parts.py)
TESTS_RUN = "pytest -m gpu"  # the tests part's one run
SIZES = {  # by --cpu: the GPU's, then the rehearsal's (tiny preset, T=64)
    False: dict(micro_batch_sizes=[16, 32], steps=5, warmup=2, accum_steps=3, accum_warmup=1, seq_length=2048),
    True: dict(micro_batch_sizes=[2, 4], steps=1, warmup=1, accum_steps=1, accum_warmup=1, seq_length=64),
}
COST_SIZES = {
    False: dict(cost_steps=45, cost_global_batch=128, cost_micro_batch=16, cost_log_interval=5, vocab_size=32000),
    True: dict(cost_steps=6, cost_global_batch=16, cost_micro_batch=2, cost_log_interval=1, vocab_size=512),
}


def _names(choices):
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"{text!r}: use a comma list of {', '.join(choices)}")
        return names

    return parse


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="benchmarks/gpu_campaign.py", description=DESCRIPTION)
    p.add_argument("--parts", type=_names(PARTS), default=list(PARTS), help="comma list, run in the order above")
    p.add_argument("--out", help="output folder (created): summary.md, <part>.json, campaign.log")
    p.add_argument("--data-dir", help="prepared corpus folder (--prepare writes it; the cost part reads it)")
    p.add_argument("--deadline-s", type=float, default=0, help="end the whole run within this many seconds (0: none)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply the deadline and budgets by this")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--cpu", action="store_true", help="rehearsal on CPU: tiny preset, CPU mode, few steps")
    for part in PARTS:
        p.add_argument(f"--{part}-budget-s", type=float, default=BUDGETS[part], help=f"seconds reserved for {part}")
    p.add_argument("--test-paths", default=",".join(GPU_TEST_FILES), help="comma list (default: the GPU tests' files)")
    p.add_argument("--throughput-runs", type=_names(list(THROUGHPUT_RUNS)), default=list(THROUGHPUT_RUNS))
    p.add_argument("--micro-batch-sizes", type=positive_int_list, help="throughput b values (16,32; 2,4 with --cpu)")
    p.add_argument("--steps", type=int, help="timed steps per throughput row (5; 1 with --cpu)")
    p.add_argument("--warmup", type=int, help="untimed steps per throughput row (2; 1 with --cpu)")
    p.add_argument("--accum-microbatches", type=int, default=8, help=f"micro-batches per step of run {ACCUM_RUN}")
    p.add_argument("--accum-steps", type=int, help=f"timed steps per row of run {ACCUM_RUN} (3; 1 with --cpu)")
    p.add_argument("--accum-warmup", type=int, help=f"untimed steps per row of run {ACCUM_RUN} (1)")
    p.add_argument("--cost-steps", type=int, help="steps of each cost run, a multiple of 3 (45; 6 with --cpu)")
    p.add_argument("--cost-global-batch", type=int, help="token-stage sequences per step (128; 16 with --cpu)")
    p.add_argument("--cost-micro-batch", type=int, help="sequences per micro-batch (16; 2 with --cpu)")
    p.add_argument("--cost-log-interval", type=int, help="steps per trainer log window (5; 1 with --cpu)")
    p.add_argument("--cost-num-workers", type=int, default=2, help="data loader workers (2; the fallback's 0)")
    p.add_argument(
        "--cost-levers",
        type=_names(["all", "none", *LEVERS]),
        default=["all"],
        help="all, none or a list; if the two-stage run with levers exits with an error, both runs rerun with none",
    )
    p.add_argument("--activations-runs", type=_names(list(ACTIVATION_RUNS)), default=DEFAULT_ACTIVATION_RUNS)
    p.add_argument("--prepare", action="store_true", help="instead: build --data-dir from --corpus (on CPU)")
    p.add_argument("--corpus", help="--prepare: JSON lines with a 'text' key (.jsonl, .jsonl.xz or .jsonl.gz)")
    p.add_argument("--vocab-size", type=int, help="--prepare: tokenizer vocabulary (32000; 512 with --cpu)")
    p.add_argument("--unpack", metavar="DIR", help="instead: write each run's own JSON from --out's part files")
    return p


def parse_options(argv: List[str]) -> argparse.Namespace:
    opts = build_parser().parse_args(argv)
    for key, value in {**SIZES[opts.cpu], **COST_SIZES[opts.cpu]}.items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    for name in "steps accum_steps accum_microbatches cost_steps cost_global_batch cost_micro_batch".split():
        if getattr(opts, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} {getattr(opts, name)} must be >= 1")
    at_least_0 = (opts.warmup, opts.accum_warmup, opts.deadline_s, opts.cost_num_workers)
    if min(*at_least_0, opts.cost_log_interval - 1, opts.vocab_size - 1) < 0:
        raise ArgumentError(
            "--warmup, --accum-warmup, --deadline-s, --cost-num-workers >= 0; --cost-log-interval, --vocab-size >= 1"
        )
    if not opts.time_scale > 0:
        raise ArgumentError(f"--time-scale {opts.time_scale} must be > 0")
    opts.deadline_s *= opts.time_scale
    opts.canary_s = CANARY_S * max(1.0, opts.time_scale)  # a smaller window does not make the run faster
    for part in PARTS:
        setattr(opts, f"{part}_budget_s", getattr(opts, f"{part}_budget_s") * opts.time_scale)
    if len(opts.cost_levers) > 1 and {"all", "none"} & set(opts.cost_levers):
        raise ArgumentError("--cost-levers: all or none alone, or a comma list of " + ", ".join(LEVERS))
    if opts.cost_steps % 3:
        raise ArgumentError(f"--cost-steps {opts.cost_steps}: use a multiple of 3 (λ=2/3 of the steps at patch level)")
    if opts.cost_global_batch % (4 * opts.cost_micro_batch):
        raise ArgumentError(
            f"--cost-global-batch: use a multiple of 4 x --cost-micro-batch = {4 * opts.cost_micro_batch}"
        )
    if opts.prepare or opts.unpack:
        needed = ["--corpus", "--data-dir"] if opts.prepare else ["--out"]
        missing = [flag for flag in needed if not getattr(opts, flag[2:].replace("-", "_"))]
        if missing:
            raise ArgumentError(f"{'--prepare' if opts.prepare else '--unpack'} needs {' and '.join(missing)}")
        return opts
    if not opts.out:
        raise ArgumentError("--out DIR is required (the output folder)")
    if "cost" in opts.parts:
        if not opts.data_dir:
            raise ArgumentError("the cost part needs --data-dir (a folder written by --prepare)")
        if not (Path(opts.data_dir) / MANIFEST).exists():
            raise ArgumentError(f"--data-dir {opts.data_dir}: no {MANIFEST}; build it with --prepare --corpus FILE")
        try:
            opts.manifest = json.loads((Path(opts.data_dir) / MANIFEST).read_text())
        except ValueError as error:  # not JSON
            raise ArgumentError(
                f"--data-dir {opts.data_dir}: {MANIFEST} is not JSON ({error}): prepare it again"
            ) from None
        if opts.manifest["cpu"] != opts.cpu:
            mode = "with" if opts.cpu else "without"
            raise ArgumentError(f"--data-dir {opts.data_dir} was prepared for the other mode: prepare it {mode} --cpu")
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise ArgumentError("megatron-core is not importable: install its wheel first (benchmarks/README.md)")
    return opts


def cost_plan(opts) -> dict:
    """What a cost run reads: steps of global batch sequences of T tokens (the token stage's)."""
    return {"steps": opts.cost_steps, "global_batch": opts.cost_global_batch, "seq_length": opts.seq_length}
