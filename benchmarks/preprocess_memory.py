"""Peak memory of tools/preprocess_data.py (main process + workers) against input size.

Usage::

    python benchmarks/preprocess_memory.py --input corpus/train.jsonl.xz --lines 3000 \\
        --scales 1 4 --workers 1 2 --output-json memory.json

Steps: (1) take the first ``--lines`` lines of ``--input`` (the *slice*) and write, for each
scale ``s`` of ``--scales``, an uncompressed JSON Lines file holding the slice ``s`` times in a
row, so every size has the same documents and the same longest line and differs only in length;
(2) unless ``--tokenizer-model`` is given, train a SentencePiece BPE tokenizer on the slice with
``tools/train_tokenizer.py`` (``--vocab-size``); (3) for each scale and each ``--workers`` count,
run ``tools/preprocess_data.py --append-eod`` as a subprocess and measure:

* ``peak PSS MB``: the largest sum, over the tool's process and all its descendants (the pool's
  workers), of their proportional set sizes, sampled every ``--interval`` s with psutil. PSS
  shares each page among the processes mapping it, so the forked workers' copy-on-write pages
  are not counted twice: this is the memory the run takes from the machine;
* ``peak RSS MB``: the same sum of resident set sizes (shared pages counted once per process);
* ``max process RSS MB``: the largest resident set any single process of the run reached, as the
  kernel recorded it (``ru_maxrss`` of a wrapper's waited-for children; exact, not sampled);
* ``vs smallest``: peak PSS divided by the peak PSS of the smallest scale with the same worker count;
* ``wall s`` and ``load``: the run's wall time and the 1-minute load average before it (only to
  judge the wall time; memory does not depend on the machine's load).

MB are 1e6 bytes. Sampling can miss a peak shorter than ``--interval``; ``max process RSS`` cannot.
Figures are printed (and written with ``--output-json``), never stored in this script. Bad flags:
one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):  # the package, and common.py beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import command_line, write_json  # noqa: E402
from preprocess_throughput import environment  # noqa: E402

from megatron_patch.errors import ArgumentError  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser, run_main  # noqa: E402

# runs ARGV as a child and prints the largest ru_maxrss (KiB on Linux) of its waited-for descendants
MAXRSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def parse_options(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="benchmarks/preprocess_memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="corpus (JSON Lines, may be .gz/.xz/.zst)")
    p.add_argument("--lines", type=int, default=3000, help="lines of the slice")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="input sizes, in copies of the slice")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run")
    p.add_argument("--tokenizer-model", help="use this .model instead of training one")
    p.add_argument("--vocab-size", type=int, default=8000, help="of the tokenizer trained on the slice")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between memory samples")
    p.add_argument("--work-dir", help="keep inputs and outputs here (default: a temporary folder, removed at the end)")
    p.add_argument("--output-json", help="also write every figure here")
    opts = p.parse_args(argv)
    if not os.path.isfile(opts.input):
        raise ArgumentError(f"--input {opts.input} does not exist")
    if opts.tokenizer_model and not os.path.isfile(opts.tokenizer_model):
        raise ArgumentError(f"--tokenizer-model {opts.tokenizer_model} does not exist")
    for name in ("lines", "scales", "workers"):
        values = getattr(opts, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            raise ArgumentError(f"--{name} {values}: every value must be >= 1")
    if opts.interval <= 0:
        raise ArgumentError(f"--interval {opts.interval} must be > 0 (seconds)")
    return opts


def write_inputs(source: str, lines: int, scales: list[int], folder: Path) -> tuple[Path, dict]:
    """The slice (first ``lines`` lines) and one file per scale; returns (slice, {scale: (path,
    bytes, lines)}). Fewer lines in ``source`` than asked is an error."""
    from megatron_patch.data.inputs import expand_inputs, iter_lines

    chunk = []
    for _, _, raw, _ in iter_lines(expand_inputs([source])):
        chunk.append(raw if raw.endswith(b"\n") else raw + b"\n")
        if len(chunk) == lines:
            break
    if len(chunk) < lines:
        raise ArgumentError(f"--lines {lines}: --input {source} holds only {len(chunk)} lines")
    piece = b"".join(chunk)
    slice_path = folder / "slice.jsonl"
    slice_path.write_bytes(piece)
    inputs = {}
    for scale in sorted(set(scales)):
        path = folder / f"x{scale}.jsonl"
        with open(path, "wb") as stream:
            for _ in range(scale):
                stream.write(piece)
        inputs[scale] = (path, scale * len(piece), scale * lines)
    return slice_path, inputs


def tree_memory(process) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes over the descendants of ``process`` alive now (the
    wrapper itself is left out)."""
    import psutil

    pss = rss = 0
    try:
        members = process.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for member in members:
        try:
            info = member.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        pss += info.pss
        rss += info.rss
    return pss, rss


def measure_run(argv: list[str], interval: float) -> dict:
    """Run ``argv`` under the ru_maxrss wrapper, sampling the tree's memory until it ends."""
    import psutil

    load = os.getloadavg()[0]
    start = time.perf_counter()
    wrapper = subprocess.Popen(
        [sys.executable, "-c", MAXRSS_WRAPPER, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watched = psutil.Process(wrapper.pid)
    peak_pss = peak_rss = samples = 0
    while wrapper.poll() is None:
        pss, rss = tree_memory(watched)
        peak_pss, peak_rss, samples = max(peak_pss, pss), max(peak_rss, rss), samples + 1
        time.sleep(interval)
    stdout, stderr = wrapper.communicate()
    wall = time.perf_counter() - start
    if wrapper.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({wrapper.returncode}): {stderr[-2000:]}")
    maxrss_kib = int(stderr.rsplit("maxrss_kib", 1)[1].split()[0])
    return {
        "peak_pss_mb": peak_pss / 1e6,
        "peak_rss_mb": peak_rss / 1e6,
        "max_process_rss_mb": maxrss_kib * 1024 / 1e6,
        "samples": samples,
        "wall_s": wall,
        "load_before": load,
        "stdout": stdout,
    }


def measure(opts, work: Path) -> tuple[dict, list[dict]]:
    """Write the inputs, train (or take) the tokenizer, run every (scale, workers) pair."""
    slice_path, inputs = write_inputs(opts.input, opts.lines, opts.scales, work)
    tokenizer = {"model": opts.tokenizer_model, "trained": opts.tokenizer_model is None}
    if opts.tokenizer_model is None:
        prefix = work / f"spm{opts.vocab_size}"
        done = subprocess.run(
            [
                sys.executable,
                str(REPO_ROOT / "tools" / "train_tokenizer.py"),
                "--input",
                str(slice_path),
                "--vocab-size",
                str(opts.vocab_size),
                "--output-prefix",
                str(prefix),
                "--force",  # a --work-dir used before holds the last run's tokenizer
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"tools/train_tokenizer.py failed: {done.stderr[-2000:]}")
        tokenizer.update(model=f"{prefix}.model", vocab_size=opts.vocab_size)
    rows = []
    for workers in opts.workers:
        for scale in sorted(inputs):
            path, size, lines = inputs[scale]
            output = work / f"out_x{scale}_w{workers}"
            result = measure_run(
                [
                    sys.executable,
                    str(REPO_ROOT / "tools" / "preprocess_data.py"),
                    "--input",
                    str(path),
                    "--tokenizer-model",
                    tokenizer["model"],
                    "--append-eod",
                    "--workers",
                    str(workers),
                    "--output-prefix",
                    str(output),
                    "--log-interval",
                    "100000000",
                ],
                opts.interval,
            )
            stdout = result.pop("stdout")
            documents = int(stdout.split("key 'text': ", 1)[1].split(" documents")[0])
            rows.append(
                {
                    "scale": scale,
                    "input_mb": size / 1e6,
                    "lines": lines,
                    "documents": documents,
                    "workers": workers,
                    **result,
                }
            )
            for ext in (".bin", ".idx"):
                os.remove(f"{output}_text_document{ext}")
    for row in rows:
        base = min((r for r in rows if r["workers"] == row["workers"]), key=lambda r: r["scale"])
        row["pss_vs_smallest"] = row["peak_pss_mb"] / base["peak_pss_mb"]
    return tokenizer, rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    return run_main(lambda: _preprocess_memory(argv))


def _preprocess_memory(argv: list[str]) -> int:
    opts = parse_options(argv)
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="preprocess-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        env = environment()
        tokenizer, rows = measure(opts, work)
    finally:
        if not opts.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print(command_line("preprocess_memory.py", argv))
    print(
        f"{env['date_utc']}; {env['device']}; Python {env['python']}, torch {env['torch']}, "
        f"megatron-core {env['megatron_core']}, sentencepiece {env['sentencepiece']}"
    )
    trained = f"BPE vocab {opts.vocab_size} trained on the slice"
    print(
        f"input: first {opts.lines} lines of {opts.input}, written {opts.scales} times; "
        f"tokenizer: {trained if tokenizer['trained'] else tokenizer['model']}"
    )
    print()
    print(
        "| workers | scale | input MB | documents | peak PSS MB | peak RSS MB | max process RSS MB "
        "| vs smallest | wall s | load |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['workers']} | {r['scale']}x | {r['input_mb']:.1f} | {r['documents']} | "
            f"{r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['max_process_rss_mb']:.0f} | "
            f"{r['pss_vs_smallest']:.3f} | {r['wall_s']:.1f} | {r['load_before']:.1f} |"
        )
    if opts.output_json:
        write_json(
            opts.output_json,
            {
                "command": command_line("preprocess_memory.py", argv),
                "environment": env,
                "slice_lines": opts.lines,
                "tokenizer": tokenizer,
                "rows": rows,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
