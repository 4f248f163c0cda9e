"""The campaign's ``summary.md``: the environment, one line per run, each part's table and the
targets, rewritten after every run from what ran so far.

Nothing here runs a model or imports the package. Units: seconds, tokens, GiB, MiB.
"""

from __future__ import annotations

import shlex
from typing import Dict, List

from campaign_figures import TARGETS, gain_vs_base, steady, target_values, throughput_rows
from common import MIB, fmt


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _mib(value) -> str:
    return fmt(None if value is None else value / MIB, ".2f", "n/a")


def _throughput_lines(part: dict) -> List[str]:
    rows, all_rows = [], throughput_rows(part)
    gains = gain_vs_base(all_rows)
    for r in all_rows:
        head = [r["run"] + (" (partial)" if r.get("partial") else ""), str(r["num_microbatches"])]
        head += [str(r["micro_batch_size"]), str(r["patch_size"])]
        if "error" in r:
            rows.append(head + ["error: " + r["error"][:60]] + [""] * 7)
            continue
        spread = "n/a" if r.get("step_s_min") is None else f"{1e3 * r['step_s_min']:.1f}-{1e3 * r['step_s_max']:.1f}"
        gain, noise = gains.get((r["run"], r["micro_batch_size"], r["patch_size"]), (None, None))
        versus = "" if gain is None else f"{gain:+.1%}" + ("" if noise is None else f" (noise {noise:.1%})")
        cells = [f"{1e3 * r['step_s_median']:.1f}", spread, versus, f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.1f}"]
        cells += [fmt(r.get("mfu"), ".3f", "n/a"), fmt(r.get("peak_memory_gib"), ".2f", "n/a")]
        rows.append(head + cells + [fmt(r.get("ratio_vs_token"), ".3f")])
    header = ["run", "micro-batches", "b", "K", "step ms (median)", "step ms (min-max)", "vs base", "tokens/s"]
    header += ["TFLOP/s", "MFU", "peak GiB", "patch/token"]
    title = "## Throughput (`throughput.py`; MFU against the bf16 matmul measured in each run)"
    note = (
        "vs base: the step-time gain over `base` at the same b and K (base median / median - 1); noise: the "
        "larger of the two rows' max - min step time over base's median. A lever helps where its gain, at K=1 "
        "and at K=4, exceeds both its noise and 1% (the runs are separate processes)."
    )
    return [title, ""] + _dropped_lines(part) + _table(header, rows) + ([note, ""] if gains else [])


def _dropped_lines(part: dict) -> List[str]:
    """The levers a part left out after each failed alone (``campaign_parts``), and why."""
    dropped = part.get("dropped_levers", {})
    return [f"Left out after its own run failed: {name} ({why})." for name, why in dropped.items()] + (
        [""] if dropped else []
    )


def _cost_lines(part: dict) -> List[str]:
    rows = []
    for run in part["runs"]:
        stages = (run.get("summary") or {}).get("stages", {})
        for stage in ("patch", "token"):
            s, rate = stages.get(stage), steady(run.get("windows", []), stage)
            if s is None and rate is None:
                continue
            cells = [run["name"], stage] + (["", "", "n/a", ""] if s is None else [])
            if s is not None:
                cells += [str(s["iterations"]), f"{s['tokens'] / 1e6:.2f}M", f"{s['seconds']:.1f}"]
                cells.append(f"{s['tokens'] / s['seconds']:,.0f}" if s["seconds"] else "")
            cells += [fmt(rate and rate["tokens_per_s"], ",.0f"), fmt(rate and rate["mfu"], ".3f", "n/a")]
            rows.append(cells + [fmt(s and s.get("peak_memory_gib"), ".2f", "n/a")])
    header = ["run", "stage", "steps", "tokens", "wall s", "tokens/s (wall)", "tokens/s (steady)", "MFU (steady)"]
    lines = [f"## End-to-end cost in the trainer ({part['setting']})", ""] + _dropped_lines(part)
    if part.get("fallback"):
        fb = part["fallback"]
        lines += [
            f"Fallback: with --cost-levers {','.join(fb['cost_levers'])} ({' '.join(fb['flags']) or 'no flags'}) "
            f"and {fb.get('num_workers', 2)} data loader workers, {fb['reason']}; both runs ran again with "
            f"{fb.get('changed', '--cost-levers none')}: the figures and targets below are from those runs.",
            "",
        ]
    lines += _table(header + ["peak GiB"], rows)
    f = part.get("figures", {})
    if f:
        lines.append(
            f"Two-stage / token-only wall: {fmt(f.get('wall_ratio'), '.3f', 'n/a')} (theory {f['theory']:.3f}); "
            f"from the steady rates: {fmt(f.get('steady_ratio'), '.3f', 'n/a')}"
            + (" (token-only stopped early: its rate from its log)" if f.get("token_only_stopped") else "")
            + f". Patch/token tokens/s in the trainer (steady): {fmt(f.get('trainer_ratio'), '.3f', 'n/a')} in the "
            f"two-stage run, {fmt(f.get('trainer_ratio_vs_token_only'), '.3f', 'n/a')} against the token-only run.\n"
        )
    return lines


def _activation_lines(part: dict) -> List[str]:
    rows = []
    for run in part["runs"]:
        for r in (run.get("payload") or {}).get("layer_activations", []):
            head = [run["name"], r["recompute"], str(r["patch_size"]), str(r["micro_batch_size"])]
            if "error" in r:
                rows.append(head + ["error: " + r["error"][:60], "", "", ""])
                continue
            per_sequence = max(r["layer_bytes"]) / r["micro_batch_size"]
            cells = [_mib(per_sequence), _mib(r["pre_bytes"]), _mib(r["post_bytes"]), _mib(r["peak_above_base_bytes"])]
            rows.append(head + cells)
    header = ["run", "recompute", "K", "b", "saved per layer per sequence MiB", "pre MiB", "post MiB"]
    title = "## Activations (`throughput.py --measure-layer-activations`)"
    return [title, ""] + _table(header + ["fwd+bwd peak above base MiB"], rows)


UNFINISHED = ("timed out", "skipped", "stopped")  # run statuses that a second call reruns (not "failed")
# --time-scale too: N is seconds of device time left, which the scale would multiply
REPLACED_FLAGS = ("--parts", "--throughput-runs", "--activations-runs", "--out", "--deadline-s", "--time-scale")


def unfinished(state: dict) -> Dict[str, List[str]]:
    """Each requested part's runs that did not finish (timed out, skipped, stopped, or never
    started), part -> run names; a run's latest attempt counts (the cost part's runs after a
    fallback: by their role)."""
    left = {}
    for name, planned in state.get("plan", {}).items():
        latest = {r.get("role", r["name"]): r for r in state["parts"].get(name, {}).get("runs", [])}
        runs = [run for run in planned if run not in latest or latest[run]["status"].startswith(UNFINISHED)]
        if runs:
            left[name] = runs
    return left


def rerun_argv(state: dict, left: Dict[str, List[str]]) -> List[str]:
    """The campaign's arguments that run just ``left`` (:func:`unfinished`): the call's own flags
    with the parts and runs replaced and ``--time-scale`` left out, what a cost fallback changed
    (``--cost-levers none``, ``--cost-num-workers 0``), ``--out $OUT`` and ``--deadline-s N`` (N:
    chosen from the device time left)."""
    fallback = "cost" in left and state["parts"].get("cost", {}).get("fallback")
    changed = ["--cost-levers", "none"] if fallback else []
    changed += ["--cost-num-workers", "0"] if fallback and fallback.get("rerun_num_workers") == 0 else []
    replaced = REPLACED_FLAGS + tuple(changed[::2])
    args, skip = [], False
    for arg in state["argv"]:
        if skip:
            skip = False
        elif arg in replaced:
            skip = True
        elif not arg.startswith(tuple(flag + "=" for flag in replaced)):
            args.append(arg)
    args += ["--parts", ",".join(left)]
    for part in ("throughput", "activations"):
        args += [f"--{part}-runs", ",".join(left[part])] if part in left else []
    return args + changed + ["--out", "$OUT", "--deadline-s", "N"]


def _unfinished_lines(state: dict) -> List[str]:
    left = unfinished(state)
    if not left:
        return []
    listed = "; ".join(f"{part}: {', '.join(runs)}" for part, runs in left.items())
    words = [arg if arg in ("$OUT", "N") else shlex.quote(arg) for arg in rerun_argv(state, left)]
    return [
        "## Not finished (timed out, skipped or stopped)",
        "",
        listed + '. To run just these (benchmarks/README.md, "Issue 16": the optional second call; '
        "N from the device time left):",
        "",
        "`python3 benchmarks/gpu_campaign.py " + " ".join(words) + "`",
        "",
    ]


def summary_markdown(state: dict, accum_run: str) -> str:
    """Everything that ran so far: environment, one line per run, each part's table, the targets."""
    env, parts = state["environment"], state["parts"]
    lines = [f"# GPU campaign: {', '.join(state['parts_requested'])}" + (" (CPU rehearsal)" if state["cpu"] else "")]
    lines += ["", f"Command: `{state['command']}`  "]
    lines.append(f"Started {env['date_utc']}; {env['device']}; Python {env['python']}, torch {env['torch']}, ")
    lines[-1] += f"megatron-core {env['megatron_core']}; {state['elapsed_s']:.0f} s so far"
    runs = [[name, r["name"], r["status"], f"{r['seconds']:.1f}"] for name, part in parts.items() for r in part["runs"]]
    lines += [""] + _table(["part", "run", "status", "seconds"], runs)
    lines += [f"{name} error: {part['error']}\n" for name, part in parts.items() if "error" in part]
    lines += _unfinished_lines(state)
    if parts.get("tests", {}).get("counts"):
        c = parts["tests"]["counts"]
        counts = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
        failing = "; failing: " + ", ".join(c["failures"]) if c["failures"] else ""
        failing += " (from the log: the run was stopped before pytest's report)" if c.get("partial") else ""
        lines += ["## Tests (`-m gpu`)", "", counts + failing, ""]
    for name, render in (("throughput", _throughput_lines), ("cost", _cost_lines), ("activations", _activation_lines)):
        if parts.get(name, {}).get("runs"):
            lines += render(parts[name])
    values, rows = target_values(parts, accum_run), []
    for key, (label, op, goal) in TARGETS.items():
        if key in values:
            value, note = values[key]
            met = value >= goal if op == ">=" else value <= goal
            measured = f"{value:.3f}" + (f" ({note})" if note else "")
            rows.append([label, measured, f"{op} {goal}", "met" if met else "NOT met"])
    if rows:
        lines += ["## Targets (issue 16)" + (": CPU rehearsal, not comparable" if state["cpu"] else ""), ""]
        lines += _table(["target", "measured", "goal", ""], rows)
    return "\n".join(lines) + "\n"
