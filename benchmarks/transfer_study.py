"""Does the patch stage transfer? Held-out loss of token-only, control and patch + token runs on the
quick start's data and model, over seeds, patch sizes K and data fractions lambda (CPU).

    python benchmarks/transfer_study.py --workdir runs/transfer_study \
        --seeds 1,2,3 --fractions 1/4,1/2,2/3 --patch-sizes 2,4 --jobs 2

Three arms per seed, each trained by the real trainer (``examples/pretrain_patch_gpt.py``, one
process at TP=1, so ``--jobs 2`` runs two at once on two cores) with the quick start's settings
(``examples/quickstart.py``: the bundled corpus with every 10th document held out, its tokenizer,
T=128, 16 sequences per step, its steps and schedule), and scored by ``tools/evaluate.py`` on the
held-out documents:

* token-only: all the training tokens at token level (``--patch-size 1``);
* control (per lambda): the token stage alone, from random initialisation, on the same last
  1-lambda of the tokens with the same steps and schedule (``--stage token`` without
  ``--pretrained-checkpoint``); it does not depend on K;
* patch + token (per lambda, K): both stages (``--stage both``); its switch checkpoint is also
  scored, the token-level loss right after the patch stage.

transfer = control loss - (patch + token) loss, paired by seed (both arms read the same token-stage
documents in the same order): positive means the patch stage helped. The report (``report.md``,
``results.json``, ``transfer.png`` in the workdir) gives the mean, the sample standard deviation and
the range over seeds. A run that trained to its end is not trained again, and every run passes
``--load`` of its own ``--save`` folder, so an interrupted study resumes each unfinished run from its
last checkpoint.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    command_line,
    environment,
    positive_int_list,
    write_json,
    write_text,
)
from megatron_patch.checkpoint.folders import checkpoint_dir  # noqa: E402
from megatron_patch.errors import ArgumentError  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser, run_main  # noqa: E402


@functools.lru_cache(maxsize=None)
def _quickstart():
    """examples/quickstart.py as a module (its corpus, flags and run helpers), loaded once."""
    spec = importlib.util.spec_from_file_location("examples_quickstart", REPO / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fraction_list(text: str) -> list:
    """``"1/4,1/2"`` -> ``[Fraction(1, 4), Fraction(1, 2)]``; every value strictly between 0 and 1."""
    import argparse

    try:
        values = [Fraction(part.strip()) for part in text.split(",") if part.strip()]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of fractions like 1/4,2/3") from None
    if not values or not all(0 < value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every lambda must lie strictly between 0 and 1")
    return values


def plan_runs(seeds: list, fractions: list, patch_sizes: list) -> dict:
    """``{run name: {arm, seed, fraction, K}}`` in the order they are trained (seed by seed).

    One control per (lambda, seed): the token stage's documents, steps and schedule depend on
    lambda, not on K, so it is trained with the first K (at lambda=1/4, seed 1, K=2 and K=4 gave
    the same held-out loss to four decimals).
    """
    runs = {}
    for seed in seeds:
        runs[f"token-only-seed{seed}"] = {"arm": "token-only", "seed": seed, "fraction": None, "K": 1}
        for fraction in fractions:
            tag = f"lambda{fraction.numerator}_{fraction.denominator}"
            runs[f"control-{tag}-seed{seed}"] = {
                "arm": "control",
                "seed": seed,
                "fraction": fraction,
                "K": patch_sizes[0],
            }
            for K in patch_sizes:
                runs[f"patch_token-{tag}-K{K}-seed{seed}"] = {
                    "arm": "patch+token",
                    "seed": seed,
                    "fraction": fraction,
                    "K": K,
                }
    return runs


def run_flags(run: dict, s: dict, data: dict, quickstart) -> list:
    """Trainer flags of one run: the quick start's model, data, budget and schedule at TP=1."""
    fraction = float(run["fraction"]) if run["fraction"] is not None else quickstart.PATCH_FRACTION
    flags = quickstart.training_flags(s, data, tensor_parallel=1, patch_fraction=fraction)
    flags += ["--seed", run["seed"], "--patch-size", run["K"]]
    if run["arm"] == "control":
        flags += ["--stage", "token"]
    return flags


class StudyError(RuntimeError):
    pass


def _step(command: list, log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(str(c) for c in command)}\n")
        out.flush()
        code = subprocess.run(
            [str(c) for c in command], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        raise StudyError(f"{command[1]} exited with code {code}; see {log}")


def train(flags: list, save: Path, log: Path) -> dict:
    """Train one run into ``save`` unless it trained to its end; returns its summary. ``--load`` of
    the same folder: a run killed (or stopped by a signal) after a checkpoint resumes from it, one
    killed before its first checkpoint starts afresh."""
    quickstart = _quickstart()
    if not quickstart.trained(save):
        _step(quickstart.train_command([sys.executable], flags, save), log)
        if not quickstart.trained(save):  # a trainer stopped by a signal saves, writes this summary and exits 0
            raise StudyError(f"the run in {save} stopped before its end; re-run to resume it")
    return json.loads((save / "summary.json").read_text())


def _train_and_score(name: str, run: dict, flags: list, work: Path, data: dict) -> dict:
    """Train one run (unless done), score its final checkpoint (and, for patch + token, its switch
    checkpoint) on the held-out documents; returns the run with its losses and step seconds."""
    py = sys.executable
    save, log = work / name, work / "logs" / f"{name}.log"
    start = time.perf_counter()
    summary = train(flags, save, log)
    scored = {"final": save}
    if run["arm"] == "patch+token":
        scored["after_patch"] = Path(checkpoint_dir(str(save), summary["stages"]["patch"]["iterations"]))
    result = dict(
        run,
        fraction=None if run["fraction"] is None else str(run["fraction"]),
        seconds={stage: value["seconds"] for stage, value in summary["stages"].items()},
        tokens=summary["total_tokens"],
    )
    outputs = {label: work / f"eval_{name}_{label}.json" for label in scored}
    pending = [label for label in scored if not outputs[label].exists()]  # all of them in one call
    if pending:
        _step(
            [py, "tools/evaluate.py", "--cpu", "--load", *(scored[label] for label in pending)]
            + ["--input", data["heldout"], "--tokenizer-model", data["tokenizer"], "--micro-batch-size", "32"]
            + ["--output-json", *(outputs[label] for label in pending)],
            log,
        )
    for label in scored:
        result[f"loss_{label}"] = json.loads(outputs[label].read_text())["loss"]
    print(f"== {name}: held-out loss {result['loss_final']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return result


def _spread(values: list) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(results: dict, fractions: list, patch_sizes: list) -> dict:
    """Per (lambda, K): spread over seeds of control, patch + token, after-patch and transfer losses."""
    by_arm = {}
    for result in results.values():
        key = (result["arm"], result["fraction"], result["K"])
        by_arm.setdefault(key, {})[result["seed"]] = result
    token_only = by_arm.get(("token-only", None, 1), {})
    if not token_only:
        raise StudyError("no token-only run finished: nothing to compare with")
    rows = []
    for fraction in fractions:
        for K in patch_sizes:
            control = by_arm.get(("control", str(fraction), patch_sizes[0]), {})
            patch = by_arm.get(("patch+token", str(fraction), K), {})
            seeds = sorted(set(control) & set(patch))
            if not seeds:
                continue  # neither paired run finished for any seed
            rows.append(
                {
                    "fraction": str(fraction),
                    "K": K,
                    "seeds": seeds,
                    "theoretical_cost": float(fraction / K + 1 - fraction),
                    "control": _spread([control[seed]["loss_final"] for seed in seeds]),
                    "patch+token": _spread([patch[seed]["loss_final"] for seed in seeds]),
                    "after_patch": _spread([patch[seed]["loss_after_patch"] for seed in seeds]),
                    "transfer": _spread([control[seed]["loss_final"] - patch[seed]["loss_final"] for seed in seeds]),
                }
            )
    return {"token-only": _spread([run["loss_final"] for run in token_only.values()]), "rows": rows}


def _fmt(spread: dict) -> str:
    return f"{spread['mean']:.3f} ± {spread['std']:.3f} [{spread['min']:.3f}, {spread['max']:.3f}]"


def report(summary: dict) -> str:
    token_only = summary["token-only"]
    lines = [
        f"token-only, all tokens: {_fmt(token_only)} (n={token_only['n']})",
        "",
        "| λ | K | seeds | cost (theory) | control | patch + token | transfer (control − patch+token) | "
        "right after the patch stage |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary["rows"]:
        seeds = ",".join(map(str, row["seeds"]))
        lines.append(
            f"| {row['fraction']} | {row['K']} | {seeds} | {row['theoretical_cost']:.3f} | {_fmt(row['control'])} | "
            f"{_fmt(row['patch+token'])} | {_fmt(row['transfer'])} | {_fmt(row['after_patch'])} |"
        )
    lines += ["", "Held-out loss in nats (token level): mean ± sample standard deviation [min, max] over seeds."]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (losses, transfers) = plt.subplots(1, 2, figsize=(11, 4.5))
    token_only = summary["token-only"]
    losses.axhspan(
        token_only["min"], token_only["max"], color="grey", alpha=0.3, label="token-only, all tokens (range)"
    )
    patch_sizes = sorted({row["K"] for row in summary["rows"]})
    for K, marker in zip(patch_sizes, "os^v"):
        rows = [row for row in summary["rows"] if row["K"] == K]
        x = [float(Fraction(row["fraction"])) for row in rows]
        # the control does not depend on K: drawn once, from the first K's rows
        arms = (("control", "--", "control (any K)"),) if K == patch_sizes[0] else ()
        for arm, style, label in arms + (("patch+token", "-", f"patch + token, K={K}"),):
            y = [row[arm]["mean"] for row in rows]
            err = [
                [row[arm]["mean"] - row[arm]["min"] for row in rows],
                [row[arm]["max"] - row[arm]["mean"] for row in rows],
            ]
            losses.errorbar(x, y, yerr=err, linestyle=style, marker=marker, capsize=3, label=label)
        y = [row["transfer"]["mean"] for row in rows]
        err = [
            [row["transfer"]["mean"] - row["transfer"]["min"] for row in rows],
            [row["transfer"]["max"] - row["transfer"]["mean"] for row in rows],
        ]
        transfers.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=f"K={K}")
    transfers.axhline(0.0, color="black", linewidth=0.8)
    for axes in (losses, transfers):
        axes.set_title("mean over seeds; bars: min to max", fontsize=9)
    losses.set_xlabel("λ (fraction of the tokens trained at patch level)")
    transfers.set_xlabel("λ")
    losses.set_ylabel("held-out loss, token level (nats)")
    transfers.set_ylabel("transfer = control − (patch + token) (nats; > 0 helps)")
    losses.legend(fontsize=8)
    transfers.legend(fontsize=8)
    figure.tight_layout()
    partial = path.with_suffix(".tmp.png")
    figure.savefig(partial, dpi=110)
    partial.replace(path)
    return True


def main(argv=None) -> int:
    return run_main(lambda: _study(argv))


def _study(argv) -> int:
    parser = ArgumentParser(prog="benchmarks/transfer_study.py", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO / "runs" / "transfer_study"))
    parser.add_argument("--seeds", type=positive_int_list, default=[1, 2, 3], help="trainer seeds, e.g. 1,2,3")
    parser.add_argument("--fractions", type=fraction_list, default=fraction_list("1/4,1/2,2/3"), help="lambda values")
    parser.add_argument("--patch-sizes", type=positive_int_list, default=[2, 4], help="K values (each >= 2)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one process, one core each)")
    parser.add_argument("--reduced", action="store_true", help="the quick start's reduced settings (tests)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the runs that finished (each row names its seeds)",
    )
    args = parser.parse_args(argv)
    if min(args.patch_sizes) < 2:
        raise ArgumentError(
            f"--patch-sizes {args.patch_sizes}: K=1 is the token-only arm, which always runs; give K >= 2"
        )
    if args.jobs < 1:
        raise ArgumentError(f"--jobs {args.jobs} must be >= 1")
    quickstart = _quickstart()
    s = quickstart.settings(args.reduced)
    work = Path(args.workdir).resolve()
    quickstart.check_workdir(work, s, "transfer_study")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    data = quickstart.prepare_data(work / "corpus", s)
    runs = plan_runs(args.seeds, args.fractions, args.patch_sizes)
    print(f"== {len(runs)} runs, {args.jobs} at a time; logs in {work / 'logs'}", flush=True)
    results, failures = {}, []
    if args.report_only:  # finished runs only (scoring a finished run that was not scored yet)
        runs = {name: run for name, run in runs.items() if quickstart.trained(work / name)}
        print(f"== --report-only: {len(runs)} finished runs", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            pool.submit(_train_and_score, name, run, run_flags(run, s, data, quickstart), work, data): name
            for name, run in runs.items()
        }
        for future in as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except StudyError as error:
                failures.append(f"{futures[future]}: {error}")
    if failures:
        print("transfer_study: " + "; ".join(failures) + " (fix and re-run: finished runs are kept)", file=sys.stderr)
        return 1
    try:
        summary = summarise(results, args.fractions, args.patch_sizes)
    except StudyError as error:
        print(f"transfer_study: {error}", file=sys.stderr)
        return 1
    table = report(summary)
    header = (
        f"{command_line('transfer_study.py', list(argv if argv is not None else sys.argv[1:]))}\n"
        f"{json.dumps(environment(cpu=True))}"
    )
    payload = {
        "command": header.splitlines()[0],
        "environment": environment(cpu=True),
        "settings": s,
        "summary": summary,
        "runs": results,
    }
    write_json(work / "results.json", payload)
    plotted = plot(summary, work / "transfer.png")
    write_text(
        work / "report.md", f"```\n{header}\n```\n\n{table}\n" + ("\n![transfer](transfer.png)\n" if plotted else "")
    )
    print(f"\n{header}\n\n{table}\nreport: {work / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
