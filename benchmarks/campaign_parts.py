"""The GPU campaign's parts, each a list of runs of the project's own commands: ``tests``
(``pytest -m gpu``), ``throughput`` (``throughput.py`` per lever set), ``cost`` (the trainer,
two-stage against token-only on the prepared corpus) and ``activations``
(``throughput.py --measure-layer-activations``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import List

from campaign_figures import cost_figures
from campaign_logs import junit_counts, pytest_log_counts, throughput_partial_rows, trainer_windows
from campaign_options import (
    ACCUM_RUN,
    ACTIVATION_RUNS,
    ALL_SIZES_RUNS,
    CANARY_RUN,
    COST_RUNS,
    KERNEL_TABLE_ROWS,
    KERNEL_TABLE_RUNS,
    LEVERS,
    TESTS_RUN,
    THROUGHPUT_RUNS,
    cost_plan,
)
from campaign_runner import REPO_ROOT, Campaign

PY = sys.executable


# the targets are judged without Transformer Engine, and --sdpa-backend is the local layers' (auto would
# pick TE where it imports)
LOCAL_LAYERS = ["--transformer-impl", "local"]


def _model_flags(opts, model: str = "370m") -> List[str]:
    return LOCAL_LAYERS + (["--cpu"] if opts.cpu else ["--model", model, "--seq-length", str(opts.seq_length)])


def part_tests(c: Campaign) -> None:
    part = c.begin("tests")
    xml = c.work / "tests.xml"
    named = [p for p in c.opts.test_paths.split(",") if p]
    # a path that is gone would stop pytest before it runs anything: listed, not passed
    paths = [p for p in named if (REPO_ROOT / p).exists()]
    if len(paths) < len(named):
        part["missing_paths"] = [p for p in named if p not in paths]
    # -v: a line per finished test, so a run stopped at its time limit (no junit file) still counts;
    # --continue-on-collection-errors: a file that fails to import costs its own tests, not the others'
    cmd = [PY, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "--continue-on-collection-errors", f"--junitxml={xml}"]
    _, output = c.run(part, TESTS_RUN, [*cmd, *paths])
    part["counts"] = junit_counts(str(xml)) or pytest_log_counts(output)


def part_throughput(c: Campaign) -> None:
    opts, part = c.opts, c.begin("throughput")
    for name in opts.throughput_runs:
        sizes = ",".join(map(str, opts.micro_batch_sizes if name in ALL_SIZES_RUNS else opts.micro_batch_sizes[:1]))
        json_path = c.work / f"throughput_{name}.json"
        steps, warmup, micro = (opts.steps, opts.warmup, 1)
        if name == ACCUM_RUN:
            steps, warmup, micro = (opts.accum_steps, opts.accum_warmup, opts.accum_microbatches)
        sweep = f"--micro-batch-size {sizes} --patch-sizes 1,4 --steps {steps} --warmup {warmup}"
        cmd = [PY, "benchmarks/throughput.py", *_model_flags(opts), *sweep.split(), "--num-microbatches", str(micro)]
        levers = lever_flags(THROUGHPUT_RUNS[name], without=c.failed_levers)
        cmd += [*levers, "--output-json", str(json_path)]
        cmd += ["--kernel-table", str(KERNEL_TABLE_ROWS)] if name in KERNEL_TABLE_RUNS else []
        cap = opts.canary_s if name == CANARY_RUN else math.inf  # its hang or crawl: a failure, at the cap
        record, output = c.run(part, name, cmd, cap_s=cap, num_microbatches=micro)
        if name in LEVERS and lever_failure(record, levers):  # a lever alone failed: left out from here on
            reason = f"the {name} run {record['status']}: {_error_line(output)}"
            c.failed_levers[name] = part.setdefault("dropped_levers", {})[name] = reason
            print(f"[throughput] {reason}; the later runs and the cost part leave {name} out", flush=True)
        if record["status"] == "ok" and json_path.exists():
            record["payload"] = json.loads(json_path.read_text())
        else:
            record["partial_rows"] = throughput_partial_rows(output)
        c.save()


def lever_names(names: List[str]) -> List[str]:
    """The levers ``--cost-levers``-style names (all, none, or lever names) stand for."""
    return [lever for name in names for lever in {"all": list(LEVERS), "none": []}.get(name, [name])]


def lever_flags(names: List[str], without=()) -> List[str]:
    """The trainer flags of ``names`` (:func:`lever_names`), less the levers in ``without``."""
    return [flag for lever in lever_names(names) if lever not in without for flag in LEVERS[lever]]


def lever_failure(record: dict, levers: List[str]) -> bool:
    """Whether a run with levers (or other flags a fallback drops) exited with an error or ran past
    its own cap (:meth:`Campaign.run`): not a timeout at the part's limit, a stop or a skip, which say
    nothing about the levers."""
    return bool(levers) and record["status"].startswith("failed")


def _error_line(output: str) -> str:
    """The line that says why a run failed: the last one naming an error, else the last one."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    named = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
    return ((named or lines or ["no output"])[-1])[:300]


def part_cost(c: Campaign) -> None:
    """Two-stage, then token-only, with ``--cost-levers`` and ``--cost-num-workers``; when the
    two-stage run with levers or workers exits with an error (a lever's compile, a data loader
    worker's crash), both runs again without either, in the time left, so that the cost targets are
    still measured, and the part records what it changed and why."""
    opts, manifest, data = c.opts, c.opts.manifest, Path(c.opts.data_dir)
    levers = lever_flags(opts.cost_levers, without=c.failed_levers)
    model = ["--model", "370m", "--bf16", "--seq-length", str(opts.seq_length)]
    model = LOCAL_LAYERS + (["--model", "tiny", "--cpu"] if opts.cpu else model)
    setting = f"{'tiny, CPU' if opts.cpu else '370m, bf16'}, {opts.cost_steps} steps of {opts.cost_global_batch} x "
    setting += f"{opts.seq_length} tokens, micro-batch {opts.cost_micro_batch}, {opts.cost_num_workers} data loader "
    setting += f"workers, levers: {' '.join(levers) or 'none'}"
    tokens = opts.cost_steps * opts.cost_global_batch * opts.seq_length
    part = c.begin("cost", setting=setting, data=manifest, tokens_per_run=tokens, levers=levers)
    dropped = {name: why for name, why in c.failed_levers.items() if name in lever_names(opts.cost_levers)}
    if dropped:  # failed alone in the throughput part
        part["dropped_levers"] = dropped
    if manifest["plan"] != cost_plan(opts):
        part["note"] = f"data prepared for {manifest['plan']}: documents may repeat, or go unread"
    common = [PY, "examples/pretrain_patch_gpt.py", *model, "--micro-batch-size", str(opts.cost_micro_batch)]
    common += ["--global-batch-size", str(opts.cost_global_batch), "--train-iters", str(opts.cost_steps)]
    common += "--lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 5 --split 100,0,0 --eval-iters 0".split()
    common += ["--data-path", str(data / manifest["prefix"]), "--tokenizer-model", str(data / manifest["tokenizer"])]
    common += ["--log-interval", str(opts.cost_log_interval), "--data-cache-path", str(c.work / "data_cache")]
    # workers (2), as the launch scripts: batches are read beside the steps, not between them
    workers = ["--num-workers", str(opts.cost_num_workers)]
    # what the fallback drops, both new on the device: the levers, and the data loader's worker processes
    droppable = levers + (workers if opts.cost_num_workers else [])
    failed = _cost_runs(c, part, [*common, *workers], levers, "", droppable)
    if failed is not None:
        record, output = failed
        reason = f"the two-stage run {record['status']} after {record['seconds']:.0f} s: {_error_line(output)}"
        changed = "--cost-levers none" + (" and --num-workers 0" if opts.cost_num_workers else "")
        part["fallback"] = {"cost_levers": opts.cost_levers, "flags": levers, "reason": reason, "rerun_with": "none"}
        part["fallback"].update(num_workers=opts.cost_num_workers, rerun_num_workers=0, changed=changed)
        part["levers"] = []
        print(f"[cost] {reason}; both runs again with {changed}", flush=True)
        _cost_runs(c, part, [*common, "--num-workers", "0"], [], " (no levers)")


def _cost_runs(c: Campaign, part: dict, common: List[str], levers: List[str], suffix: str, droppable=()):
    """Two-stage, then token-only (after two-stage, which alone gives the in-trainer ratio), with
    ``levers``; the part's figures from these runs. Returns (record, output) of a two-stage run that
    failed with ``droppable`` flags (then token-only is not run), else None."""
    two_stage, token_only = COST_RUNS
    runs = {two_stage: ["--stage", "both", "--patch-size", "4", "--patch-data-fraction", repr(2 / 3)]}
    runs[token_only] = ["--patch-size", "1"]
    done = {}
    for role, flags in runs.items():
        summary = c.work / f"summary_{role}{'-no-levers' if suffix else ''}.json"
        cmd = [*common, *levers, *flags, "--summary-json", str(summary)]
        record, output = c.run(part, role + suffix, cmd, role=role, levers=" ".join(levers) or "none")
        record["windows"] = trainer_windows(output)
        ok = record["status"] == "ok" and summary.exists()
        record["summary"] = json.loads(summary.read_text()) if ok else None
        done[role] = record
        part["figures"] = cost_figures(done)
        c.save()
        if role == two_stage and lever_failure(record, list(droppable)):
            return record, output
    return None


def part_activations(c: Campaign) -> None:
    opts, part = c.opts, c.begin("activations")
    for name in opts.activations_runs:
        model, layers, recompute, flags = ACTIVATION_RUNS[name]
        json_path = c.work / f"acts_{name}.json"
        cmd = [PY, "benchmarks/throughput.py", *_model_flags(opts, model), "--measure-layer-activations"]
        cmd += ["--layers", str(layers)] if layers else []
        cmd += ["--micro-batch-size", "1,2", "--patch-sizes", "1,4", "--recompute-granularity", recompute, *flags]
        record, _ = c.run(part, name, [*cmd, "--output-json", str(json_path)])
        ok = record["status"] == "ok" and json_path.exists()
        record["payload"] = json.loads(json_path.read_text()) if ok else None
        c.save()


PART_RUNNERS = {"tests": part_tests, "throughput": part_throughput, "cost": part_cost, "activations": part_activations}
