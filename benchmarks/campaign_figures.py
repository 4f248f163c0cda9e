"""The campaign's figures: steady rates from the trainer's log windows, the two-stage vs token-only
cost, the throughput rows with their patch/token ratios and MFU, and issue 16's four targets.

Nothing here runs a model or imports the package. Units: seconds, tokens.
"""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Tuple

from common import fmt

TARGETS = {  # issue 16: label, comparison, goal
    "token_mfu": ("token-stage MFU, all five levers, 8 micro-batches per step (best b)", ">=", 0.50),
    "bench_ratio": ("patch/token tokens/s at K=4, same run and b (benchmark)", ">=", 3.9),
    "trainer_ratio": ("patch/token tokens/s inside the trainer (steady, two-stage run)", ">=", 3.7),
    "wall_ratio": ("two-stage / token-only step time in the trainer, at the stages' steady rates", "<=", 0.53),
}


def steady(windows: List[dict], stage: str) -> Optional[dict]:
    """Median tokens/s and MFU of a stage's log windows after its first (which holds the start-up
    and torch.compile); the only window when there is one."""
    rows = [w for w in windows if w["stage"] == stage]
    use = rows[1:] or rows
    if not use:
        return None
    mfus = [w["mfu"] for w in use if w["mfu"] is not None]
    rate = statistics.median(w["tokens_per_s"] for w in use)
    return {"tokens_per_s": rate, "mfu": statistics.median(mfus) if mfus else None, "windows": len(use)}


def cost_figures(runs: Dict[str, dict]) -> dict:
    """Two-stage vs token-only: the wall ratio (sums of the stages' step times, from the trainer's
    summaries, so each stage's first steps and their one-off ``torch.compile``s included: two sets in
    the two-stage run, one in token-only), the same from the steady rates (the time each run's tokens
    take at its stages' median rates after their first log window: what a long job pays per token,
    and what issue 16's target is judged on), and the patch stage's tokens/s over the token stage's
    inside the trainer. A token-only run stopped early still gives its steady rate."""
    both, only = runs.get("two-stage", {}), runs.get("token-only", {})
    if not both.get("summary"):
        return {}
    stages = both["summary"]["stages"]
    figures = {"theory": both["summary"]["theoretical_relative_cost"]}
    patch, token = steady(both["windows"], "patch"), steady(both["windows"], "token")
    alone = steady(only.get("windows", []), "token")
    if patch and token:
        figures["trainer_ratio"] = patch["tokens_per_s"] / token["tokens_per_s"]
    if patch and alone:
        figures["trainer_ratio_vs_token_only"] = patch["tokens_per_s"] / alone["tokens_per_s"]
    if only.get("summary"):
        only_seconds = sum(s["seconds"] for s in only["summary"]["stages"].values())
        figures["wall_ratio"] = sum(s["seconds"] for s in stages.values()) / only_seconds
    if patch and token and alone:
        seconds = stages["patch"]["tokens"] / patch["tokens_per_s"] + stages["token"]["tokens"] / token["tokens_per_s"]
        tokens = sum(s["tokens"] for s in stages.values())
        figures["steady_ratio"] = seconds / (tokens / alone["tokens_per_s"])
        figures["token_only_stopped"] = not only.get("summary")
    return figures


def throughput_rows(part: dict) -> List[dict]:
    """Every row of every throughput run, tagged with the run; a stopped run's rows get their
    patch/token ratio here and their MFU against the median matmul peak of the completed runs."""
    peaks = [(r.get("payload") or {}).get("matmul_peak_tflops") for r in part.get("runs", [])]
    peak = statistics.median([p for p in peaks if p]) if any(peaks) else None
    rows = []
    for run in part.get("runs", []):
        source = run["payload"]["results"] if run.get("payload") else run.get("partial_rows", [])
        rows += [dict(row, run=run["name"], num_microbatches=run["num_microbatches"]) for row in source]
    token = {(r["run"], r["micro_batch_size"]): r for r in rows if r["patch_size"] == 1 and "error" not in r}
    for r in rows:
        if r.get("partial"):
            base = token.get((r["run"], r["micro_batch_size"]))
            r["mfu"] = r["tflops"] / peak if peak else None
            r["ratio_vs_token"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
    return rows


def gain_vs_base(rows: List[dict], base_run: str = "base") -> Dict[Tuple[str, int, int], Tuple[float, Optional[float]]]:
    """Each row's step-time gain over ``base_run``'s row at the same b, K and micro-batches per step
    (base median / row median - 1: 0.05 is 5% faster), and the noise it is judged against: the
    larger of the two rows' max - min step times over base's median (None where a row has no
    spread: a stopped run's rows). (run, b, K) -> (gain, noise)."""
    key = lambda r: (r["micro_batch_size"], r["patch_size"], r["num_microbatches"])  # noqa: E731
    base = {key(r): r for r in rows if r["run"] == base_run and "error" not in r}
    gains = {}
    for r in rows:
        b = base.get(key(r))
        if r["run"] == base_run or b is None or "error" in r:
            continue
        spreads = [x["step_s_max"] - x["step_s_min"] for x in (r, b) if x.get("step_s_max") is not None]
        noise = max(spreads) / b["step_s_median"] if len(spreads) == 2 else None
        gains[(r["run"], r["micro_batch_size"], r["patch_size"])] = (b["step_s_median"] / r["step_s_median"] - 1, noise)
    return gains


def target_values(parts: Dict[str, dict], accum_run: str) -> Dict[str, Tuple[float, str]]:
    """The issue's four figures, from whichever parts ran: name -> (value, note)."""
    values = {}
    rows = [r for r in throughput_rows(parts.get("throughput", {})) if r["run"] == accum_run and "error" not in r]
    token = [r for r in rows if r["patch_size"] == 1 and r.get("mfu") is not None]
    if token:
        best = max(token, key=lambda r: r["mfu"])
        b = best["micro_batch_size"]
        causal = best.get("flops_per_position_causal")
        also = (
            f"; {best['mfu'] * causal / best['flops_per_position']:.3f} counting causal attention as half"
            if causal
            else ""
        )
        values["token_mfu"] = (best["mfu"], f"b={b}{also}")
        ratios = [r["ratio_vs_token"] for r in rows if r["patch_size"] == 4 and r["micro_batch_size"] == b]
        if ratios and ratios[0]:
            values["bench_ratio"] = (ratios[0], f"b={b}")
    f = parts.get("cost", {}).get("figures", {})
    if "trainer_ratio" in f:
        values["trainer_ratio"] = (f["trainer_ratio"], "")
    if "steady_ratio" in f:  # a short run's sums hold each stage's one-off compiles: shown beside it
        note = f"theory {f['theory']:.3f}; sums of all step times {fmt(f.get('wall_ratio'), '.3f', 'n/a')}"
        values["wall_ratio"] = (f["steady_ratio"], note)
    return values
