"""The GPU campaign of issue 16: one entry point that turns a short GPU window into the speed and
cost figures, part by part, each part's JSON and log written as it goes.

Usage (benchmarks/README.md, "Issue 16: the GPU campaign", has the device commands and what each
part runs)::

    python benchmarks/gpu_campaign.py --prepare --corpus train.jsonl.xz --data-dir .campaign   # once, on CPU
    python3 benchmarks/gpu_campaign.py --parts tests,throughput --out OUT --deadline-s 320     # GPU, call 1
    python3 benchmarks/gpu_campaign.py --parts cost,activations --data-dir .campaign --out OUT --deadline-s 320
    python benchmarks/gpu_campaign.py ... --cpu            # rehearsal: tiny preset, CPU mode, few steps

Parts, in this order: ``tests`` (``pytest -m gpu``), ``throughput`` (``throughput.py``: the four
MFU levers alone and together, and together at 8 micro-batches per step), ``cost`` (the trainer,
``--stage both`` against token-only on the same tokens of the prepared corpus) and
``activations`` (``throughput.py --measure-layer-activations``). Every run is a subprocess given
the time its part has left and stopped there: a part's ``--<part>-budget-s`` is reserved for it,
and within ``--deadline-s`` it may also use what earlier parts left. OUT receives ``summary.md``
and per part ``<part>.json`` and ``<part>.log``, rewritten under temporary names after every run,
so a campaign stopped at its time limit leaves what finished. ``--unpack DIR`` writes each run's
own ``throughput.py`` JSON from those files (for ``memory_plan.py --measured``).

Optional parts, not run by this script (one device call each, when a window has time left;
benchmarks/README.md has the commands): ``multi-epoch``, the multi-epoch recipe's three arms
(``examples/reproduce_small.py --epochs 4``: token-only, patch λ=1/2 over the epochs, and the
control that trains only the last half of the epochs at token level), 3 seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py and campaign_io.py beside this file

import campaign_io as cio  # noqa: E402
from common import FlagParser, UsageError, positive_int_list, write_json  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SCHEMA = "megatron_patch.gpu_campaign/1"
PARTS = ("tests", "throughput", "cost", "activations")
BUDGETS = {"tests": 75, "throughput": 240, "cost": 265, "activations": 50}  # seconds; two calls of <= 320 s
LEVERS = {"swiglu": ["--bias-swiglu-fusion"], "rope": ["--rope-fusion"], "ce": ["--cross-entropy-fusion"]}
LEVERS["adam"] = ["--torch-adam-impl", "fused"]
ALL_LEVERS = [flag for flags in LEVERS.values() for flag in flags]
ACCUM_RUN = "all-accum"
THROUGHPUT_RUNS = {ACCUM_RUN: ALL_LEVERS, "base": [], "all": ALL_LEVERS, **LEVERS}
ACTIVATION_RUNS = {  # name: (preset, layers, recompute modes, flags)
    "370m": ("370m", None, "none,selective,full", []),
    "370m-swiglu": ("370m", None, "none", LEVERS["swiglu"]),
    "370m-all": ("370m", None, "none", LEVERS["swiglu"] + LEVERS["rope"] + LEVERS["ce"]),
    "6.7b": ("6.7b", 2, "none,selective,full", []),
    "13b": ("13b", 2, "none,selective,full", []),
}
SIZES = {  # by --cpu: the GPU's, then the rehearsal's (tiny preset, T=64)
    False: dict(micro_batch_sizes=[16, 32], steps=5, warmup=2, accum_steps=3, accum_warmup=1, seq_length=2048),
    True: dict(micro_batch_sizes=[2, 4], steps=1, warmup=1, accum_steps=1, accum_warmup=1, seq_length=64),
}
COST_SIZES = {
    False: dict(cost_steps=60, cost_global_batch=128, cost_micro_batch=16, cost_log_interval=5, vocab_size=32000),
    True: dict(cost_steps=6, cost_global_batch=16, cost_micro_batch=2, cost_log_interval=1, vocab_size=512),
}


class Stopped(Exception):
    """SIGTERM: stop the running subprocess, write what finished, exit."""


def _names(choices):
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"{text!r}: use a comma list of {', '.join(choices)}")
        return names

    return parse


def build_parser() -> FlagParser:
    p = FlagParser(prog="benchmarks/gpu_campaign.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--parts", type=_names(PARTS), default=list(PARTS), help="comma list, run in the order above")
    p.add_argument("--out", help="output folder (created): summary.md, <part>.json, <part>.log")
    p.add_argument("--data-dir", help="prepared corpus folder (--prepare writes it; the cost part reads it)")
    p.add_argument("--deadline-s", type=float, default=0, help="end the whole run within this many seconds (0: none)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply the deadline and budgets by this")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--cpu", action="store_true", help="rehearsal on CPU: tiny preset, CPU mode, few steps")
    for part in PARTS:
        p.add_argument(f"--{part}-budget-s", type=float, default=BUDGETS[part], help=f"seconds reserved for {part}")
    p.add_argument("--test-paths", default="tests/unit,tests/data,tests/training,tests/tools,tests/benchmarks")
    p.add_argument("--throughput-runs", type=_names(list(THROUGHPUT_RUNS)), default=list(THROUGHPUT_RUNS))
    p.add_argument("--micro-batch-sizes", type=positive_int_list, help="throughput b values (16,32; 2,4 with --cpu)")
    p.add_argument("--steps", type=int, help="timed steps per throughput row (5; 1 with --cpu)")
    p.add_argument("--warmup", type=int, help="untimed steps per throughput row (2; 1 with --cpu)")
    p.add_argument("--accum-microbatches", type=int, default=8, help=f"micro-batches per step of run {ACCUM_RUN}")
    p.add_argument("--accum-steps", type=int, help=f"timed steps per row of run {ACCUM_RUN} (3; 1 with --cpu)")
    p.add_argument("--accum-warmup", type=int, help=f"untimed steps per row of run {ACCUM_RUN} (1)")
    p.add_argument("--cost-steps", type=int, help="steps of each cost run, a multiple of 3 (60; 6 with --cpu)")
    p.add_argument("--cost-global-batch", type=int, help="token-stage sequences per step (128; 16 with --cpu)")
    p.add_argument("--cost-micro-batch", type=int, help="sequences per micro-batch (16; 2 with --cpu)")
    p.add_argument("--cost-log-interval", type=int, help="steps per trainer log window (5; 1 with --cpu)")
    p.add_argument("--cost-levers", type=_names(["all", "none", *LEVERS]), default=["all"], help="all, none or a list")
    p.add_argument("--activations-runs", type=_names(list(ACTIVATION_RUNS)), default=list(ACTIVATION_RUNS))
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
            raise UsageError(f"--{name.replace('_', '-')} {getattr(opts, name)} must be >= 1")
    if min(opts.warmup, opts.accum_warmup, opts.deadline_s, opts.cost_log_interval - 1, opts.vocab_size - 1) < 0:
        raise UsageError("--warmup, --accum-warmup, --deadline-s >= 0; --cost-log-interval, --vocab-size >= 1")
    if not opts.time_scale > 0:
        raise UsageError(f"--time-scale {opts.time_scale} must be > 0")
    opts.deadline_s *= opts.time_scale
    for part in PARTS:
        setattr(opts, f"{part}_budget_s", getattr(opts, f"{part}_budget_s") * opts.time_scale)
    if len(opts.cost_levers) > 1 and {"all", "none"} & set(opts.cost_levers):
        raise UsageError("--cost-levers: all or none alone, or a comma list of " + ", ".join(LEVERS))
    if opts.cost_steps % 3:
        raise UsageError(f"--cost-steps {opts.cost_steps}: use a multiple of 3 (λ=2/3 of the steps at patch level)")
    if opts.cost_global_batch % (4 * opts.cost_micro_batch):
        raise UsageError(f"--cost-global-batch: use a multiple of 4 x --cost-micro-batch = {4 * opts.cost_micro_batch}")
    if opts.prepare or opts.unpack:
        needed = ["--corpus", "--data-dir"] if opts.prepare else ["--out"]
        missing = [flag for flag in needed if not getattr(opts, flag[2:].replace("-", "_"))]
        if missing:
            raise UsageError(f"{'--prepare' if opts.prepare else '--unpack'} needs {' and '.join(missing)}")
        return opts
    if not opts.out:
        raise UsageError("--out DIR is required (the output folder)")
    if "cost" in opts.parts:
        if not opts.data_dir:
            raise UsageError("the cost part needs --data-dir (a folder written by --prepare)")
        if not (Path(opts.data_dir) / cio.MANIFEST).exists():
            raise UsageError(f"--data-dir {opts.data_dir}: no {cio.MANIFEST}; build it with --prepare --corpus FILE")
        opts.manifest = json.loads((Path(opts.data_dir) / cio.MANIFEST).read_text())
        if opts.manifest["cpu"] != opts.cpu:
            mode = "with" if opts.cpu else "without"
            raise UsageError(f"--data-dir {opts.data_dir} was prepared for the other mode: prepare it {mode} --cpu")
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise UsageError("megatron-core is not importable: install its wheel first (benchmarks/README.md)")
    return opts


def cost_plan(opts) -> dict:
    """What a cost run reads: steps of global batch sequences of T tokens (the token stage's)."""
    return {"steps": opts.cost_steps, "global_batch": opts.cost_global_batch, "seq_length": opts.seq_length}


def environment(cpu: bool) -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    device = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    if not cpu:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            device = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        device = device or "nvidia-smi gave no GPU"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = {"date_utc": date, "python": platform.python_version(), "torch": version("torch")}
    return dict(env, megatron_core=version("megatron-core"), device=device)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Campaign:
    """Runs the parts' subprocesses against the clock and rewrites the outputs after each run."""

    def __init__(self, opts, argv: List[str], work: Path):
        self.opts, self.work, self.out = opts, work, Path(opts.out)
        self.start = time.monotonic()
        # 10 s before the deadline: 5 s for a stopped run to exit, then the summary
        self.deadline = self.start + opts.deadline_s - 10 if opts.deadline_s else math.inf
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        self.state = {"schema": SCHEMA, "command": "python benchmarks/gpu_campaign.py " + shlex.join(argv)}
        self.state.update(cpu=opts.cpu, parts_requested=opts.parts, environment=environment(opts.cpu))
        self.state.update(elapsed_s=0.0, parts={})
        self.part_end, self.log = math.inf, None

    def begin(self, name: str, **fields) -> dict:
        """Start part ``name``: its budget, and with a deadline also what earlier parts left, but never
        the budgets of the parts after it."""
        now, parts = time.monotonic(), self.opts.parts
        own = now + getattr(self.opts, f"{name}_budget_s")
        later = sum(getattr(self.opts, f"{p}_budget_s") for p in parts[parts.index(name) + 1 :])
        self.part_end = own if self.deadline == math.inf else min(self.deadline, max(own, self.deadline - later))
        self.log = self.out / f"{name}.log"
        self.log.write_text("")
        part = self.state["parts"][name] = {"part": name, "runs": [], **fields}
        self.save()
        return part

    def run(self, part: dict, name: str, cmd: List[str], **fields) -> Tuple[dict, str]:
        """Run ``cmd`` (an argument list) in the repository root with the time the part has left,
        its output appended to the part's log; returns its record (status, seconds) and output."""
        record = {"name": name, "command": shlex.join(cmd), "status": "skipped (no time left)", "seconds": 0.0}
        part["runs"].append(dict(record, **fields))
        record = part["runs"][-1]
        left, output = self.part_end - time.monotonic(), ""
        if left >= 1:
            with open(self.log, "a") as log:
                log.write(f"\n$ {record['command']}\n")
                log.flush()
                offset, started = log.tell(), time.monotonic()
                # its own process group, so that a stop reaches its compile workers too
                kw = dict(cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                proc = subprocess.Popen(cmd, **kw)
                try:
                    rc = proc.wait(timeout=left)
                    record["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
                except subprocess.TimeoutExpired:
                    record["status"] = f"timed out after {left:.0f} s"
                except Stopped:
                    record["status"] = "stopped (SIGTERM)"
                    raise
                finally:
                    if proc.poll() is None:
                        _stop(proc)
                    record["seconds"] = time.monotonic() - started
            with open(self.log, errors="replace") as log:
                log.seek(offset)
                output = log.read()
        print(f"[{part['part']}] {name}: {record['status']}, {record['seconds']:.1f} s", flush=True)
        return record, output

    def save(self) -> None:
        self.state["elapsed_s"] = time.monotonic() - self.start
        head = {"schema": SCHEMA, "command": self.state["command"], "environment": self.state["environment"]}
        for name, part in self.state["parts"].items():
            write_json(str(self.out / f"{name}.json"), {**head, **part})
        write_text(self.out / "summary.md", cio.summary_markdown(self.state, ACCUM_RUN))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group (its compile workers too), SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


def _model_flags(opts, model: str = "370m") -> List[str]:
    return ["--cpu"] if opts.cpu else ["--model", model, "--seq-length", str(opts.seq_length)]


def part_tests(c: Campaign) -> None:
    part = c.begin("tests")
    xml = c.work / "tests.xml"
    paths = [p for p in c.opts.test_paths.split(",") if p]
    c.run(part, "pytest -m gpu", [PY, "-m", "pytest", "-m", "gpu", "-q", "-rfE", f"--junitxml={xml}", *paths])
    part["counts"] = cio.junit_counts(str(xml))


def part_throughput(c: Campaign) -> None:
    opts, part = c.opts, c.begin("throughput")
    sizes = ",".join(map(str, opts.micro_batch_sizes))
    for name in opts.throughput_runs:
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
            record["partial_rows"] = cio.throughput_partial_rows(output)
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
        record["windows"] = cio.trainer_windows(output)
        ok = record["status"] == "ok" and summary.exists()
        record["summary"] = json.loads(summary.read_text()) if ok else None
        part["figures"] = cio.cost_figures({r["name"]: r for r in part["runs"]})
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


def unpack(out: Path, folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for part, prefix in (("throughput", "throughput"), ("activations", "acts")):
        path = out / f"{part}.json"
        for run in json.loads(path.read_text())["runs"] if path.exists() else []:
            if run.get("payload"):
                write_json(str(folder / f"{prefix}_{run['name']}.json"), run["payload"])
                print(folder / f"{prefix}_{run['name']}.json")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_options(argv)
        if opts.prepare:
            corpus, data_dir = Path(opts.corpus), Path(opts.data_dir)
            cio.prepare_corpus(corpus, data_dir, opts.vocab_size, cost_plan(opts), opts.cpu, argv, REPO_ROOT)
    except (UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if opts.prepare:
        lines = cio.carry_lines(REPO_ROOT, Path(opts.data_dir))
        print("\n".join(lines))
        return 1 if lines[-1].startswith("error") else 0
    if opts.unpack:
        return unpack(Path(opts.out), Path(opts.unpack))
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="gpu_campaign-"))
    work.mkdir(parents=True, exist_ok=True)

    def on_sigterm(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, on_sigterm)
    campaign = Campaign(opts, argv, work)
    try:
        for name in opts.parts:
            try:
                PART_RUNNERS[name](campaign)
            except (OSError, ValueError, KeyError, TypeError) as error:  # a bug here must not cost the next part
                campaign.state["parts"].setdefault(name, {"part": name, "runs": []})["error"] = repr(error)
                print(f"[{name}] error: {error!r}", flush=True)
            campaign.save()
            print(f"[{name}] done; {campaign.out / 'summary.md'} updated", flush=True)
    except Stopped:
        print("stopped by SIGTERM: writing what finished", flush=True)
    finally:
        campaign.save()
        if not opts.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + (campaign.out / "summary.md").read_text())
    parts = campaign.state["parts"].values()
    runs = [run for part in parts for run in part["runs"]]
    ok = runs and not any("error" in part for part in parts) and all(run["status"] == "ok" for run in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
