"""What goes into ``gpu_campaign.py`` and what comes out of it.

In: the prepared corpus (``prepare_corpus``: a tokenizer and a ``.bin/.idx`` of just enough
documents for the cost part, built on CPU with the project's own tools, so the device call carries
tens of MiB instead of the corpus and spends no time preprocessing) and the size of what travels.
Out: the trainer's and ``throughput.py``'s output read back (their JSON, or their log lines when a
run was stopped at its time limit), the campaign's figures, and the summary markdown.

Nothing here runs a model or imports the package. Units: seconds, tokens, GiB, MiB.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from common import fmt

MIB = 2**20
CARRY_LIMIT_BYTES = 64 * MIB  # the device tool's limit on what travels (working tree + carried paths)

# the trainer's log line (megatron_patch/training/metrics.py), e.g. "[patch] iter 5/40 (global 5) | tokens
# 1.311M | ... | 412,345 tok/s | 300.1 TFLOP/s MFU 38.0% | peak mem 27.01 GiB"
TRAINER_LINE = re.compile(
    r"\[(?P<stage>patch|token)\] iter (?P<iter>\d+)/(?P<iters>\d+) \(global \d+\) \|.*?\| "
    r"(?P<tps>[\d,]+) tok/s \| (?P<flops>[\d.]+) (?P<unit>TFLOP/s|GFLOP/s)(?: MFU (?P<mfu>[\d.]+)%)?"
    r"(?: \| peak mem (?P<peak>[\d.]+) GiB)?"
)
# throughput.py's progress line, e.g. "  recompute=none b=16 K=1: 283.1 ms, 115,855 tok/s, 303.8 TFLOP/s, ..."
THROUGHPUT_LINE = re.compile(
    r"recompute=(?P<recompute>\w+) b=(?P<b>\d+) K=(?P<K>\d+): (?P<ms>[\d.]+) ms, (?P<tps>[\d,]+) tok/s, "
    r"(?P<tflops>[\d.e+-]+) TFLOP/s"
)
TARGETS = {  # issue 16: label, comparison, goal
    "token_mfu": ("token-stage MFU, all four levers, 8 micro-batches per step (best b)", ">=", 0.50),
    "bench_ratio": ("patch/token tokens/s at K=4, same run and b (benchmark)", ">=", 3.9),
    "trainer_ratio": ("patch/token tokens/s inside the trainer (steady, two-stage run)", ">=", 3.7),
    "wall_ratio": ("two-stage wall / token-only wall (trainer step time)", "<=", 0.53),
}


# --------------------------------------------------------------------------- parsing
def _number(text: Optional[str], scale: float = 1.0) -> Optional[float]:
    return None if text is None else float(text.replace(",", "")) * scale


def trainer_windows(text: str) -> List[dict]:
    """The trainer's log lines: one dict per logged window (tokens/s, TFLOP/s, MFU, peak GiB)."""
    windows = []
    for m in TRAINER_LINE.finditer(text):
        window = {"stage": m["stage"], "iteration": int(m["iter"]), "stage_iters": int(m["iters"])}
        window["tokens_per_s"] = _number(m["tps"])
        window["tflops"] = _number(m["flops"], 1e-3 if m["unit"] == "GFLOP/s" else 1.0)
        window.update(mfu=_number(m["mfu"], 0.01), peak_memory_gib=_number(m["peak"]))
        windows.append(window)
    return windows


def throughput_partial_rows(text: str) -> List[dict]:
    """Rows of a ``throughput.py`` run stopped before it wrote its JSON (no MFU, no memory)."""
    rows = []
    for m in THROUGHPUT_LINE.finditer(text):
        row = {"recompute": m["recompute"], "micro_batch_size": int(m["b"]), "patch_size": int(m["K"])}
        row.update(step_s_median=_number(m["ms"], 1e-3), tokens_per_s=_number(m["tps"]), tflops=_number(m["tflops"]))
        row.update(stage="token" if m["K"] == "1" else "patch", mfu=None, peak_memory_gib=None, partial=True)
        rows.append(row)
    return rows


def junit_counts(path: str) -> Optional[dict]:
    """passed/failed/errors/skipped and the failing tests' names from pytest's ``--junitxml`` file."""
    from xml.etree import ElementTree

    if not os.path.exists(path):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        kind = "failed" if "failure" in kinds else "errors" if "error" in kinds else None
        kind = kind or ("skipped" if "skipped" in kinds else "passed")
        counts[kind] += 1
        if kind in ("failed", "errors"):
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


# --------------------------------------------------------------------------- figures
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
    summaries), the same from the steady rates, and the patch stage's tokens/s over the token
    stage's inside the trainer. A token-only run stopped early still gives its steady rate."""
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


def target_values(parts: Dict[str, dict], accum_run: str) -> Dict[str, Tuple[float, str]]:
    """The issue's four figures, from whichever parts ran: name -> (value, note)."""
    values = {}
    rows = [r for r in throughput_rows(parts.get("throughput", {})) if r["run"] == accum_run and "error" not in r]
    token = [r for r in rows if r["patch_size"] == 1 and r.get("mfu") is not None]
    if token:
        best = max(token, key=lambda r: r["mfu"])
        b = best["micro_batch_size"]
        values["token_mfu"] = (best["mfu"], f"b={b}")
        ratios = [r["ratio_vs_token"] for r in rows if r["patch_size"] == 4 and r["micro_batch_size"] == b]
        if ratios and ratios[0]:
            values["bench_ratio"] = (ratios[0], f"b={b}")
    f = parts.get("cost", {}).get("figures", {})
    if "trainer_ratio" in f:
        values["trainer_ratio"] = (f["trainer_ratio"], "")
    if "wall_ratio" in f:
        note = f"theory {f['theory']:.3f}; steady {fmt(f.get('steady_ratio'), '.3f')}"
        values["wall_ratio"] = (f["wall_ratio"], note)
    return values


# --------------------------------------------------------------------------- markdown
def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _mib(value) -> str:
    return fmt(None if value is None else value / MIB, ".2f", "n/a")


def _throughput_lines(part: dict) -> List[str]:
    rows = []
    for r in throughput_rows(part):
        head = [r["run"] + (" (partial)" if r.get("partial") else ""), str(r["num_microbatches"])]
        head += [str(r["micro_batch_size"]), str(r["patch_size"])]
        if "error" in r:
            rows.append(head + ["error: " + r["error"][:60]] + [""] * 5)
            continue
        cells = [f"{1e3 * r['step_s_median']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.1f}"]
        cells += [fmt(r.get("mfu"), ".3f", "n/a"), fmt(r.get("peak_memory_gib"), ".2f", "n/a")]
        rows.append(head + cells + [fmt(r.get("ratio_vs_token"), ".3f")])
    header = ["run", "micro-batches", "b", "K", "step ms", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "patch/token"]
    title = "## Throughput (`throughput.py`; MFU against the bf16 matmul measured in each run)"
    return [title, ""] + _table(header, rows)


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
    lines = [f"## End-to-end cost in the trainer ({part['setting']})", ""] + _table(header + ["peak GiB"], rows)
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
    if parts.get("tests", {}).get("counts"):
        c = parts["tests"]["counts"]
        counts = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
        failing = "; failing: " + ", ".join(c["failures"]) if c["failures"] else ""
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


# --------------------------------------------------------------------------- what travels
def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.exists() else 0


def tree_bytes(repo: Path) -> Optional[int]:
    """Bytes of the working tree that travels (tracked and untracked-not-ignored files); None
    without git."""
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    try:
        out = subprocess.run(command, cwd=repo, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    files = {repo / name for name in out.decode().split("\0") if name}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def carry_lines(repo: Path, data_dir: Path) -> List[str]:
    """What the device call takes along: the working tree, ``.whl`` and the prepared data."""
    tree, wheel, data = tree_bytes(repo), folder_bytes(repo / ".whl"), folder_bytes(data_dir)
    total = (tree or 0) + wheel + data
    sizes = f"working tree {fmt(None if tree is None else tree / MIB, '.1f', 'n/a (no git)')} MiB, "
    sizes += f".whl {wheel / MIB:.1f} MiB, {data_dir} {data / MIB:.1f} MiB"
    lines = [f"carry: {sizes}: {total / MIB:.1f} MiB of {CARRY_LIMIT_BYTES / MIB:.0f} MiB"]
    if not list((repo / ".whl").glob("megatron_core-*-cp312-*.whl")):
        lines.append("note: no megatron-core cp312 wheel in .whl/ (benchmarks/README.md says how to download it)")
    if total > CARRY_LIMIT_BYTES:
        lines.append("error: over the device tool's limit; prepare fewer tokens or carry less")
    return lines


# --------------------------------------------------------------------------- the prepared corpus
MANIFEST = "manifest.json"
TOKENIZER = "campaign.model"
PREFIX = "campaign_text_document"  # tools/preprocess_data.py's name for --output-prefix DIR/campaign, key text
BYTES_PER_TOKEN_GUESS = 4.2  # JSON-lines bytes per token of a first cut (3.9 with the 32k tokenizer, RESULTS.md)
PATCH_SIZE, PATCH_FRACTION = 4, 2 / 3  # the cost part's two-stage run
IDX_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron IndexedDataset dtype codes


def indexed_lengths(prefix: Path) -> List[int]:
    """Tokens per document of a megatron ``.bin/.idx`` pair (one sequence per document, as
    ``tools/preprocess_data.py`` writes them), read from the index and checked against the ``.bin``."""
    with open(f"{prefix}.idx", "rb") as f:
        if f.read(9) != b"MMIDIDX\x00\x00":
            raise ValueError(f"{prefix}.idx is not a megatron index")
        _version, code, sequences, _documents = struct.unpack("<QBQQ", f.read(25))
        lengths = array("i")
        lengths.frombytes(f.read(4 * sequences))
    if os.path.getsize(f"{prefix}.bin") != sum(lengths) * IDX_ITEMSIZE[code]:
        raise ValueError(f"{prefix}.bin does not hold the {sum(lengths)} tokens its index lists")
    return list(lengths)


def shortfall(lengths: List[int], plan: dict) -> float:
    """How many times more samples the two-stage cost run of ``plan`` needs than the documents give
    (<= 1: they suffice), under the trainer's rule: the patch stage takes the documents up to the
    first whose cumulative tokens reach λ of the total, the token stage the rest, and a stage of
    samples of L tokens draws (tokens - 1) // L of them from one pass."""
    K, T, gbs, steps = PATCH_SIZE, plan["seq_length"], plan["global_batch"], plan["steps"]
    total, cut = sum(lengths), 0
    for n in lengths:
        cut += n
        if cut >= PATCH_FRACTION * total:
            break
    patch_steps = round(PATCH_FRACTION * steps)
    needs = [(patch_steps * gbs // K, cut, K * T), ((steps - patch_steps) * gbs, total - cut, T)]
    return max(need / max((tokens - 1) // length, 1e-9) for need, tokens, length in needs)


def _cut(corpus: Path, target: Path, byte_goal: float) -> Tuple[int, int, bool]:
    """The corpus' first lines holding at least ``byte_goal`` bytes -> ``target``; returns (lines,
    bytes, whether the corpus ran out)."""
    if corpus.suffix in (".zst", ".bz2"):
        raise ValueError(f"--corpus {corpus}: decompress it first, or recompress it with xz")
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(corpus.suffix, open)
    lines = used = 0
    with opener(corpus, "rb") as src, open(target, "wb") as dst:
        for line in src:
            if used >= byte_goal:
                return lines, used, False
            dst.write(line)
            lines, used = lines + 1, used + len(line)
    return lines, used, True


def _tool(args: List[str], repo: Path) -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ValueError(f"{args[0]} failed (exit {done.returncode}): {last}")
    print(f"{args[0]}: {time.monotonic() - started:.1f} s", flush=True)


def prepare_corpus(corpus: Path, data_dir: Path, vocab_size: int, plan: dict, cpu: bool, argv: List[str], repo: Path):
    """Train a SentencePiece tokenizer on ``corpus`` and preprocess its first documents, as many as
    one pass of the cost runs of ``plan`` (steps, global_batch, seq_length) needs with 5% to spare,
    into ``data_dir`` (built beside it under a temporary name, renamed when complete); returns the
    manifest, also written as ``data_dir/manifest.json``."""
    if (data_dir / MANIFEST).exists():
        manifest = json.loads((data_dir / MANIFEST).read_text())
        if (manifest["plan"], manifest["vocab_size"], manifest["cpu"]) == (plan, vocab_size, cpu):
            print(f"{data_dir}: already prepared ({manifest['tokens']:,} tokens)")
            return manifest
        raise ValueError(f"--data-dir {data_dir} holds data prepared with other settings: remove it first")
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise ValueError(f"--data-dir {data_dir} exists and is not a prepared folder: remove it or name a new one")
    if not corpus.is_file():
        raise ValueError(f"--corpus {corpus}: no such file")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}-", suffix=".partial", dir=data_dir.parent))
    stage.chmod(0o755)  # mkdtemp makes it private
    tokenizer = ["tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", str(vocab_size)]
    tokenizer += ["--input-sentence-size", "300000", "--output-prefix", str(stage / "campaign")]
    preprocess = ["tools/preprocess_data.py", "--tokenizer-model", str(stage / TOKENIZER), "--append-eod"]
    preprocess += ["--output-prefix", str(stage / "campaign"), "--workers", str(min(4, os.cpu_count() or 1))]
    try:
        with tempfile.TemporaryDirectory(prefix="campaign-cut-") as scratch:
            _tool(tokenizer, repo)
            (stage / "campaign.vocab").unlink(missing_ok=True)  # not read by the trainer
            cut = Path(scratch) / "cut.jsonl"
            # at least 256 KiB of text, so that a small plan still has documents on both sides of the λ cut
            goal = max(plan["steps"] * plan["global_batch"] * plan["seq_length"] * BYTES_PER_TOKEN_GUESS, MIB / 4)
            for _attempt in range(8):  # the first cut usually suffices; else grow it by what it lacked
                lines, used, exhausted = _cut(corpus, cut, goal)
                _tool(preprocess + ["--input", str(cut)], repo)
                lengths = indexed_lengths(stage / PREFIX)
                lacking = shortfall(lengths, plan)
                if lacking <= 1 / 1.05 or exhausted:
                    break
                goal = used * min(max(lacking * 1.1, 1.2), 4.0)
        if lacking > 1:
            print(f"warning: {corpus} is too small for {plan}: the cost runs repeat documents")
        manifest = {"corpus": corpus.name, "lines": lines, "bytes": used, "tokens": sum(lengths)}
        manifest.update(documents=len(lengths), plan=plan, vocab_size=vocab_size, tokenizer=TOKENIZER, prefix=PREFIX)
        manifest.update(cpu=cpu, command="python benchmarks/gpu_campaign.py " + " ".join(argv))
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if data_dir.exists():
            data_dir.rmdir()  # empty (checked above)
        os.replace(stage, data_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    print(f"{data_dir}: {sum(lengths):,} tokens in {len(lengths)} documents ({used / MIB:.1f} MiB of text)")
    print(f"vocabulary {vocab_size}; a cost run reads {lacking:.0%} of the fuller stage's samples")
    return manifest
