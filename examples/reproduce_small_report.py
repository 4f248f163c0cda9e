"""The report of the small-scale reproduction (``reproduce_small.py``): the table of held-out loss,
perplexity and wall time per run (mean, sample standard deviation and range over seeds), the transfer
table of each patch run against its control, ``curves.json`` (validation loss against training tokens
and model FLOPs) and, with matplotlib, their plot, all in ``report.md`` under --workdir.
"""

import json
import math
import statistics
import time
from pathlib import Path

from reproduce_small_runs import CONTROLS, FRACTIONS, run_folder, theoretical_cost

from megatron_patch.runtime import atomic_file


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


def write_report(work: Path, names: list, seeds: list) -> None:
    losses, seconds, epochs = {}, {}, {}
    for name in names:
        for seed in seeds:
            folder = run_folder(name, seed)
            summary = json.loads((work / folder / "summary.json").read_text())
            seconds.setdefault(name, []).append(sum(stage["seconds"] for stage in summary["stages"].values()))
            if summary.get("stage_split") == "epochs":
                epochs[name] = " + ".join(
                    f"{stage} {values['epochs']:.2f}" for stage, values in summary["stages"].items()
                )
            for data_name in ("valid", "wikitext103"):
                loss = json.loads((work / f"eval_{folder}_{data_name}.json").read_text())["loss"]
                losses.setdefault((name, data_name), []).append(loss)
    lines = [
        "| run | cost (theory) | wall s | valid loss | valid ppl | WikiText-103 loss | WikiText-103 ppl |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        valid, wiki = losses[(name, "valid")], losses[(name, "wikitext103")]
        lines.append(
            f"| {name} | {theoretical_cost(name):.3f} | {statistics.fmean(seconds[name]):.0f} | {spread(valid)} | "
            f"{math.exp(statistics.fmean(valid)):.2f} | {spread(wiki)} | {math.exp(statistics.fmean(wiki)):.2f} |"
        )
    pairs = [name for name in FRACTIONS if name in names and f"control-{name}" in names]
    if pairs:
        lines += [
            "",
            "| lambda | transfer, valid (control − patch+token) | transfer, WikiText-103 | "
            "patch+token − token-only, valid |",
            "| --- | --- | --- | --- |",
        ]
        for name in pairs:
            transfer = {
                data: [c - p for c, p in zip(losses[(f"control-{name}", data)], losses[(name, data)])]
                for data in ("valid", "wikitext103")
            }
            versus = (
                spread([p - t for p, t in zip(losses[(name, "valid")], losses[("token-only", "valid")])])
                if "token-only" in names
                else "(token-only not run)"
            )
            lines.append(f"| {name} | {spread(transfer['valid'])} | {spread(transfer['wikitext103'])} | {versus} |")
        lines += ["", "transfer > 0: the patch stage helped the token stage; < 0: it hurt (paired by seed)."]
    if epochs:
        lines += [
            "",
            "Epochs over the training documents per stage (--stage-split epochs): "
            + "; ".join(f"{name}: {text}" for name, text in epochs.items())
            + ".",
        ]
    if len(seeds) > 1:
        lines += [
            f"Losses: mean ± sample standard deviation [min, max] over seeds {', '.join(map(str, seeds))}; "
            f"perplexities of the mean loss."
        ]
    table = "\n".join(lines)
    print("\n" + table)
    curves = {}
    for name in names:
        folder = run_folder(name, seeds[0])
        summary = json.loads((work / folder / "summary.json").read_text())
        records = [json.loads(line) for line in (work / folder / "metrics.jsonl").read_text().splitlines()]
        curves[name] = validation_curve(summary, records)
    # a control starts where its patch run's token stage starts: placed there on the token axis
    offsets = {name: FRACTIONS[name[len("control-") :]] if name in CONTROLS else 0.0 for name in names}
    atomic_file.write_json(
        work / "curves.json",
        {
            name: [{"tokens": t, "flops": f, "valid_loss": loss} for t, f, loss in points]
            for name, points in curves.items()
        },
    )
    report = [f"# Small-scale reproduction ({time.strftime('%Y-%m-%d')})", "", table, ""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report.append("(matplotlib not installed: no plot)")
    else:
        figure, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        total = max((p[0] for name, points in curves.items() if name not in CONTROLS for p in points), default=0.0)
        for name, points in curves.items():
            if points:
                style = "--" if name in CONTROLS else "-"
                shift = offsets[name] * total
                by_tokens.plot(
                    [(p[0] + shift) / 1e6 for p in points], [p[2] for p in points], style, marker=".", label=name
                )
                by_flops.plot([p[1] / 1e15 for p in points], [p[2] for p in points], style, marker=".", label=name)
        by_tokens.set_xlabel("training tokens (millions; a control placed at its token stage)")
        by_flops.set_xlabel("training compute (model PFLOP)")
        by_tokens.set_ylabel("validation loss, token level (nats)")
        by_flops.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(work / "loss_curves.png", dpi=120)
        report.append(f"![validation loss](loss_curves.png) (seed {seeds[0]})")
    atomic_file.write_text(work / "report.md", "\n".join(report) + "\n")
    print(f"report: {work / 'report.md'}")
