"""The report of the small-scale reproduction (``reproduce_small.py``), over every run of --workdir
that trained to its end and was evaluated (whichever --runs and --seeds made it): what was
measured (mode, model, precision, seeds, evaluated documents, from the runs' own records), the table
of tokens, cost, held-out loss, perplexity and wall time per run (mean, sample standard deviation
and range over its seeds), the transfer table of each patch run against its control, ``curves.json``
(validation loss against training tokens and model FLOPs) and, with matplotlib, their plot, all in
``report.md`` under --workdir.
"""

import json
import math
import statistics
import time
from pathlib import Path

from pipeline import RECORD, trained
from reproduce_small_runs import CONTROLS, FRACTIONS, RUN_NAMES, parse_run_folder, run_folder

from megatron_patch.errors import VerificationError
from megatron_patch.runtime import atomic_file

DATA_SETS = {"valid": "valid", "wikitext103": "WikiText-103"}  # evaluation file stem: its name in the tables


def validation_curve(summary: dict, records: list) -> list:
    """(training tokens, model FLOPs, validation loss) at each validation of a run, counted from the
    run's own first step.

    Both stages consume the same tokens per step; a patch-stage step costs the FLOPs the
    trainer's summary gives per patch iteration (about 1/K of a token-stage step). A control's
    records carry global iteration numbers (its token stage starts after the lambda*N patch
    steps it skips); they are counted from its own first step here.
    """
    stages = summary["stages"]
    tokens_per_step = summary["total_tokens"] / sum(stage["iterations"] for stage in stages.values())
    patch = stages.get("patch", {"iterations": 0, "flops": 0.0})
    patch_step_flops = patch["flops"] / max(patch["iterations"], 1)
    token = stages.get("token", {"iterations": 0, "flops": 0.0})
    token_step_flops = token["flops"] / max(token["iterations"], 1)
    train = [record for record in records if record["kind"] == "train" and "stage_iteration" in record]
    skipped = 0 if "patch" in stages or not train else train[0]["iteration"] - train[0]["stage_iteration"]
    curve = []
    for record in records:
        if record["kind"] != "valid":
            continue
        step = record["iteration"] - skipped
        patch_steps = min(step, patch["iterations"])
        flops = patch_steps * patch_step_flops + (step - patch_steps) * token_step_flops
        curve.append((step * tokens_per_step, flops, record["loss"]))
    return curve


def spread(values: list) -> str:
    """One value as it is; several as mean ± sample standard deviation [min, max]."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def finished_runs(work: Path):
    """``({name: [seeds]}, [folders])``: the runs in ``work`` that trained to their end and were
    evaluated on every data set (in ``RUN_NAMES`` order, seeds ascending), and the folders of runs
    that trained to their end but lack an evaluation."""
    found, unevaluated = {}, []
    for entry in sorted(work.iterdir()):
        parsed = parse_run_folder(entry.name) if entry.is_dir() else None
        if parsed is None or not trained(entry):
            continue
        if all((work / f"eval_{entry.name}_{data}.json").exists() for data in DATA_SETS):
            found.setdefault(parsed[0], []).append(parsed[1])
        else:
            unevaluated.append(entry.name)
    return {name: sorted(found[name]) for name in RUN_NAMES if name in found}, unevaluated


def _measured(record: dict, runs: dict, evaluations: dict) -> list:
    """Report lines saying what was measured, from the workdir's settings record and the evaluations'
    own files (model, precision, documents and tokens scored); VerificationError when the runs were
    scored on different documents."""
    seeds = sorted({seed for run_seeds in runs.values() for seed in run_seeds})
    models = sorted({e["model"] for e in evaluations.values()})
    dtypes = sorted({e["dtype"] for e in evaluations.values()})
    scored = []
    for data, title in DATA_SETS.items():
        per_run = {
            (e["documents"], e["tokens"], Path(e["input"][0]).name) for k, e in evaluations.items() if k[2] == data
        }
        if len(per_run) > 1:
            raise VerificationError(
                f"the runs' {title} evaluations scored different documents ({sorted(per_run)}): remove the stale "
                f"eval_*_{data}.json files of the workdir and re-run"
            )
        documents, tokens, name = per_run.pop()
        scored.append(f"{documents} documents of {name} ({tokens:,} tokens)")
    device = "CPU" if record.get("cpu") else f"{record.get('nproc')} GPU process(es)"
    mode = (
        "--reduced smoke run (tiny model and budget: not the reproduction's numbers)"
        if record.get("reduced")
        else "full settings"
    )
    passes = (
        f"{record['epochs']:g} epochs over the training documents (--stage-split epochs)"
        if record.get("epochs")
        else "one pass over the training documents, split by documents between the stages"
    )
    if record.get("train_documents"):
        passes += f", the first {record['train_documents']} documents of the training file only"
    lines = [
        f"What was measured: {mode}, on {device}; model {', '.join(models)} trained in {', '.join(dtypes)}; "
        f"{passes}; seeds {', '.join(map(str, seeds))}; held-out token-level loss on {' and '.join(scored)}"
        + (
            f" (--reduced scores only the first {record['max_documents']} documents of each file)"
            if record.get("max_documents")
            else ""
        )
        + ".",
        "",
        "Runs: every run of this workdir that trained to its end and was evaluated, whichever --runs made it.",
    ]
    return lines


def write_report(work: Path, requested: list) -> None:
    """``report.md``, ``curves.json`` and the plot over every finished run in ``work``; prints the tables
    and which runs they cover (``requested``: the runs of this invocation)."""
    runs, unevaluated = finished_runs(work)
    record = json.loads((work / RECORD).read_text())
    summaries = {
        (name, seed): json.loads((work / run_folder(name, seed) / "summary.json").read_text())
        for name, seeds in runs.items()
        for seed in seeds
    }
    evaluations = {
        (name, seed, data): json.loads((work / f"eval_{run_folder(name, seed)}_{data}.json").read_text())
        for name, seed in summaries
        for data in DATA_SETS
    }

    def losses(name: str, data: str, seeds: list) -> list:
        return [evaluations[(name, seed, data)]["loss"] for seed in seeds]

    first = {name: summaries[(name, seeds[0])] for name, seeds in runs.items()}
    token_only_flops = (
        sum(s["flops"] for s in first["token-only"]["stages"].values()) if "token-only" in first else None
    )
    lines = [
        "| run | seeds | tokens | cost, theory | model FLOPs / token-only's | train s | valid loss | valid ppl "
        "| WikiText-103 loss | WikiText-103 ppl |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, seeds in runs.items():
        summary = first[name]
        flops = sum(stage["flops"] for stage in summary["stages"].values())
        flops_ratio = f"{flops / token_only_flops:.3f}" if token_only_flops else "—"
        seconds = statistics.fmean(
            sum(s["seconds"] for s in summaries[(name, seed)]["stages"].values()) for seed in seeds
        )
        valid, wiki = losses(name, "valid", seeds), losses(name, "wikitext103", seeds)
        lines.append(
            f"| {name} | {', '.join(map(str, seeds))} | {summary['total_tokens']:,} | "
            f"{summary['theoretical_relative_cost']:.3f} | {flops_ratio} | {seconds:.0f} | {spread(valid)} | "
            f"{math.exp(statistics.fmean(valid)):.2f} | {spread(wiki)} | {math.exp(statistics.fmean(wiki)):.2f} |"
        )
    lines += [
        "",
        "tokens: trained by the run (a control trains only the last 1 − lambda of the budget). cost, theory: the "
        "trainer's model FLOPs of the run over token-level training of the run's own tokens (lambda/K + 1 − lambda "
        "at the lambda the steps realise for a patch run; 1 for token-only and for a control). model FLOPs / "
        "token-only's: measured, against the token-only run. train s: the steps' wall time (start-up and "
        "checkpointing excluded), mean over seeds.",
    ]
    pairs = [name for name in FRACTIONS if name in runs and f"control-{name}" in runs]
    pairs = [(name, [seed for seed in runs[name] if seed in runs[f"control-{name}"]]) for name in pairs]
    pairs = [(name, seeds) for name, seeds in pairs if seeds]
    if pairs:
        lines += [
            "",
            "| lambda | seeds | transfer, valid (control − patch+token) | transfer, WikiText-103 | "
            "patch+token − token-only, valid |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, seeds in pairs:
            control = f"control-{name}"
            transfer = {
                data: [c - p for c, p in zip(losses(control, data, seeds), losses(name, data, seeds))]
                for data in DATA_SETS
            }
            shared = [seed for seed in seeds if seed in runs.get("token-only", [])]
            versus = (
                spread([p - t for p, t in zip(losses(name, "valid", shared), losses("token-only", "valid", shared))])
                + ("" if shared == seeds else f" (seeds {', '.join(map(str, shared))})")
                if shared
                else "(token-only not run with these seeds)"
            )
            lines.append(
                f"| {name} | {', '.join(map(str, seeds))} | {spread(transfer['valid'])} | "
                f"{spread(transfer['wikitext103'])} | {versus} |"
            )
        lines += ["", "transfer > 0: the patch stage helped the token stage; < 0: it hurt (paired by seed)."]
    epochs = {
        name: " + ".join(f"{stage} {values['epochs']:.2f}" for stage, values in summary["stages"].items())
        for name, summary in first.items()
        if summary.get("stage_split") == "epochs"
    }
    if epochs:
        lines += [
            "",
            "Epochs over the training documents per stage (--stage-split epochs): "
            + "; ".join(f"{name}: {text}" for name, text in epochs.items())
            + ".",
        ]
    if any(len(seeds) > 1 for seeds in runs.values()):
        lines += [
            "Losses of a run with several seeds: mean ± sample standard deviation [min, max] over its seeds; "
            "perplexities of the mean loss."
        ]
    if unevaluated:
        lines += ["", f"Trained but not evaluated, so not reported: {', '.join(unevaluated)} (re-run to evaluate)."]
    table = "\n".join(lines)
    measured = _measured(record, runs, evaluations)
    print("\n" + "\n".join(measured) + "\n\n" + table)
    curves = {}
    for name, seeds in runs.items():  # each run's first seed
        folder = run_folder(name, seeds[0])
        records = [json.loads(line) for line in (work / folder / "metrics.jsonl").read_text().splitlines()]
        curves[folder] = (name, validation_curve(first[name], records))
    atomic_file.write_json(
        work / "curves.json",
        {
            folder: [{"tokens": t, "flops": f, "valid_loss": loss} for t, f, loss in points]
            for folder, (_, points) in curves.items()
        },
    )
    title = f"# Small-scale reproduction{', --reduced smoke run' if record.get('reduced') else ''}"
    report = [f"{title} ({time.strftime('%Y-%m-%d')})", "", *measured, "", table, ""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        report.append("(matplotlib not installed: no plot)")
    # the report first, so that a failed plot loses nothing but the plot
    atomic_file.write_text(work / "report.md", "\n".join(report) + "\n")
    extra = [name for name in runs if name not in requested]
    print(
        f"report: {work / 'report.md'}, over every finished run in the workdir"
        + (f" ({', '.join(extra)} from earlier invocations)" if extra else "")
    )
    if plt is not None:
        _plot(plt, curves, work / "loss_curves.png")
        report.append("![validation loss](loss_curves.png) (each run's first seed)")
        atomic_file.write_text(work / "report.md", "\n".join(report) + "\n")


def _plot(plt, curves: dict, path: Path) -> None:
    """Validation loss against training tokens and against model FLOPs, one line per run folder."""
    # a control starts where its patch run's token stage starts: placed there on the token axis
    figure, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    total = max((p[0] for name, points in curves.values() if name not in CONTROLS for p in points), default=0.0)
    for folder, (name, points) in curves.items():
        if points:
            style = "--" if name in CONTROLS else "-"
            shift = (FRACTIONS[name[len("control-") :]] if name in CONTROLS else 0.0) * total
            by_tokens.plot(
                [(p[0] + shift) / 1e6 for p in points], [p[2] for p in points], style, marker=".", label=folder
            )
            by_flops.plot([p[1] / 1e15 for p in points], [p[2] for p in points], style, marker=".", label=folder)
    by_tokens.set_xlabel("training tokens (millions; a control placed at its token stage)")
    by_flops.set_xlabel("training compute (model PFLOP)")
    by_tokens.set_ylabel("validation loss, token level (nats)")
    by_flops.legend(fontsize=7)
    figure.tight_layout()
    atomic_file.write_with(path, lambda partial: figure.savefig(partial, dpi=120, format="png"))
    plt.close(figure)
