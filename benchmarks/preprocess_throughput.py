"""Throughput of tools/preprocess_data.py (tokens/s and MB/s) for several --workers counts.

Usage::

    python benchmarks/preprocess_throughput.py                       # train.jsonl.xz, workers 1 2
    python benchmarks/preprocess_throughput.py --tokenizer-model m.model --workers 1 2

Steps: (1) decompress the input once to count its uncompressed bytes (the MB in MB/s are these
bytes of JSON Lines, 1 MB = 1e6 bytes); (2) unless ``--tokenizer-model`` is given, train a
SentencePiece BPE tokenizer with ``tools/train_tokenizer.py`` (``--vocab-size``, on a sample of
``--tokenizer-sample-lines`` lines); (3) run ``tools/preprocess_data.py --append-eod --workers W``
as a subprocess for each W and report:

* ``tool s``: the tool's own elapsed time (its final report; no interpreter start-up), the basis
  of tokens/s and MB/s;
* ``wall s``: wall time of the whole subprocess, including Python and megatron.core imports;
* ``cpu s``: user + system CPU seconds of the subprocess and its worker processes;
* ``load``: the 1-minute load average just before the run (other jobs on the machine skew it;
  ``--quiet-load 0.3`` waits for a quiet machine first).

The outputs of all worker counts are compared byte for byte. Figures are printed, never stored.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_INPUT = REPO_ROOT.parent / "shared" / "data" / "train.jsonl.xz"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=str(DEFAULT_INPUT))
    parser.add_argument("--tokenizer-model", help="skip training and use this .model")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--tokenizer-sample-lines", type=int, default=300_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work-dir", help="keep outputs here (default: a temporary folder)")
    parser.add_argument("--quiet-load", type=float, default=None,
                        help="before each run, wait until the 1-minute load average is below this")
    parser.add_argument("--quiet-timeout", type=float, default=900,
                        help="seconds to wait for --quiet-load before running anyway")
    return parser.parse_args()


def wait_for_quiet(threshold: float | None, timeout: float) -> None:
    """Wait (up to ``timeout`` s) for other jobs on a shared machine to finish."""
    if threshold is None:
        return
    deadline = time.time() + timeout
    while os.getloadavg()[0] >= threshold and time.time() < deadline:
        time.sleep(5)


def environment() -> str:
    import megatron.core
    import numpy
    import sentencepiece
    import torch

    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
        f"sentencepiece {sentencepiece.__version__}, numpy {numpy.__version__}"
    )


def uncompressed_size(path: str) -> tuple[int, int]:
    """(bytes, lines) of the decompressed input."""
    from megatron_patch.data.inputs import describe_file, open_binary

    stream, raw = open_binary(describe_file(path))
    size = lines = 0
    with stream, raw:
        while block := stream.read(1 << 22):
            size += len(block)
            lines += block.count(b"\n")
    return size, lines


def run_tool(name: str, args: list[str]) -> tuple[str, float, float]:
    """Run tools/<name>.py; returns (stdout, wall seconds, CPU seconds incl. its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / f"{name}.py"), *args],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"tools/{name}.py failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, wall, cpu


def main() -> int:
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="preprocess-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {environment()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    size, lines = uncompressed_size(args.input)
    print(f"input: {args.input}, {size / 1e6:.1f} MB uncompressed, {lines} lines")

    model = args.tokenizer_model
    if model is None:
        prefix = work / f"spm{args.vocab_size}"
        _, wall, _ = run_tool("train_tokenizer", [
            "--input", args.input, "--vocab-size", str(args.vocab_size),
            "--input-sentence-size", str(args.tokenizer_sample_lines),
            "--output-prefix", str(prefix)])
        model = f"{prefix}.model"
        print(f"tokenizer: trained BPE vocab {args.vocab_size} on {args.tokenizer_sample_lines} "
              f"sampled lines in {wall:.1f} s (wall, incl. start-up)")
    else:
        print(f"tokenizer: {model}")

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rows, outputs = [], []
    for workers in args.workers:
        folder = work / f"workers{workers}"
        folder.mkdir(exist_ok=True)
        wait_for_quiet(args.quiet_load, args.quiet_timeout)
        load = os.getloadavg()[0]
        stdout, wall, cpu = run_tool("preprocess_data", [
            "--input", args.input, "--tokenizer-model", model, "--append-eod",
            "--workers", str(workers), "--output-prefix", str(folder / "bench"),
            "--log-interval", "100000000"])
        tool_seconds = float(re.search(r"^time: ([0-9.]+) s", stdout, re.M).group(1))
        prefix = str(folder / "bench_text_document")
        dataset = IndexedDataset(prefix)
        tokens = int(dataset.sequence_lengths.sum(dtype="int64"))
        del dataset
        outputs.append(prefix)
        rows.append((workers, tokens, tool_seconds, wall, cpu, load))

    print()
    print("| workers | tokens | tool s | wall s | cpu s | tokens/s | MB/s | load before |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for workers, tokens, tool_seconds, wall, cpu, load in rows:
        print(f"| {workers} | {tokens} | {tool_seconds:.1f} | {wall:.1f} | {cpu:.1f} | "
              f"{tokens / tool_seconds:,.0f} | {size / tool_seconds / 1e6:.2f} | {load:.2f} |")
    identical = all(
        filecmp.cmp(outputs[0] + ext, other + ext, shallow=False)
        for other in outputs[1:] for ext in (".bin", ".idx"))
    print(f"\noutputs byte-identical across worker counts: {identical}")
    print(f"work dir: {work}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
