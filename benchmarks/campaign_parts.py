"""The GPU campaign's parts, each a list of runs of the project's own commands: ``tests``
(``pytest -m gpu``), ``throughput`` (``throughput.py`` per lever set), ``cost`` (the trainer,
two-stage against token-only on the prepared corpus) and ``activations``
(``throughput.py --measure-layer-activations``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

from campaign_figures import cost_figures
from campaign_logs import junit_counts, pytest_log_counts, throughput_partial_rows, trainer_windows
from campaign_options import (
    ACCUM_RUN,
    ACTIVATION_RUNS,
    ALL_LEVERS,
    ALL_SIZES_RUNS,
    LEVERS,
    THROUGHPUT_RUNS,
    cost_plan,
)
from campaign_runner import Campaign

PY = sys.executable


def _model_flags(opts, model: str = "370m") -> List[str]:
    return ["--cpu"] if opts.cpu else ["--model", model, "--seq-length", str(opts.seq_length)]


def part_tests(c: Campaign) -> None:
    part = c.begin("tests")
    xml = c.work / "tests.xml"
    paths = [p for p in c.opts.test_paths.split(",") if p]
    # -v: a line per finished test, so a run stopped at its time limit (no junit file) still counts
    _, output = c.run(
        part, "pytest -m gpu", [PY, "-m", "pytest", "-m", "gpu", "-v", "-rfE", f"--junitxml={xml}", *paths]
    )
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
        cmd += [*THROUGHPUT_RUNS[name], "--output-json", str(json_path)]
        record, output = c.run(part, name, cmd, num_microbatches=micro)
        if record["status"] == "ok" and json_path.exists():
            record["payload"] = json.loads(json_path.read_text())
        else:
            record["partial_rows"] = throughput_partial_rows(output)
        c.save()


def part_cost(c: Campaign) -> None:
    opts, manifest, data = c.opts, c.opts.manifest, Path(c.opts.data_dir)
    levers = [flag for name in opts.cost_levers for flag in {"all": ALL_LEVERS, "none": [], **LEVERS}[name]]
    model = ["--model", "370m", "--bf16", "--seq-length", str(opts.seq_length)]
    model = ["--model", "tiny", "--cpu"] if opts.cpu else model
    setting = f"{'tiny, CPU' if opts.cpu else '370m, bf16'}, {opts.cost_steps} steps of {opts.cost_global_batch} x "
    setting += f"{opts.seq_length} tokens, micro-batch {opts.cost_micro_batch}, levers: {' '.join(levers) or 'none'}"
    tokens = opts.cost_steps * opts.cost_global_batch * opts.seq_length
    part = c.begin("cost", setting=setting, data=manifest, tokens_per_run=tokens)
    if manifest["plan"] != cost_plan(opts):
        part["note"] = f"data prepared for {manifest['plan']}: documents may repeat, or go unread"
    common = [PY, "examples/pretrain_patch_gpt.py", *model, "--micro-batch-size", str(opts.cost_micro_batch)]
    common += ["--global-batch-size", str(opts.cost_global_batch), "--train-iters", str(opts.cost_steps)]
    common += "--lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 5 --split 100,0,0 --eval-iters 0".split()
    common += ["--data-path", str(data / manifest["prefix"]), "--tokenizer-model", str(data / manifest["tokenizer"])]
    common += ["--log-interval", str(opts.cost_log_interval), "--data-cache-path", str(c.work / "data_cache"), *levers]
    runs = {"two-stage": ["--stage", "both", "--patch-size", "4", "--patch-data-fraction", repr(2 / 3)]}
    runs["token-only"] = ["--patch-size", "1"]  # after two-stage, which alone gives the in-trainer ratio
    for name, flags in runs.items():
        summary = c.work / f"summary_{name}.json"
        record, output = c.run(part, name, [*common, *flags, "--summary-json", str(summary)])
        record["windows"] = trainer_windows(output)
        ok = record["status"] == "ok" and summary.exists()
        record["summary"] = json.loads(summary.read_text()) if ok else None
        part["figures"] = cost_figures({r["name"]: r for r in part["runs"]})
        c.save()


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
