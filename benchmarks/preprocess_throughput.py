"""Throughput of tools/preprocess_data.py (tokens/s and MB/s) for several --workers counts.

Usage::

    python benchmarks/preprocess_throughput.py                       # train.jsonl.xz, workers 1 2
    python benchmarks/preprocess_throughput.py --tokenizer-model m.model --workers 1 2
    python benchmarks/preprocess_throughput.py --quiet-load 0.5      # on a shared machine

Steps: (1) decompress the input once to count its uncompressed bytes (the MB of MB/s are these
bytes of JSON Lines, 1 MB = 1e6 bytes); (2) unless ``--tokenizer-model`` is given, train a
SentencePiece BPE tokenizer with ``tools/train_tokenizer.py`` (``--vocab-size``, on a sample of
``--tokenizer-sample-lines`` lines); (3) run ``tools/preprocess_data.py --append-eod --workers W``
as a subprocess for each W and report:

* ``tool s``: the tool's own elapsed time (its final report; no interpreter start-up), the basis
  of tokens/s and MB/s;
* ``wall s``: wall time of the whole subprocess, including Python and megatron.core imports;
* ``cpu s``: user + system CPU seconds of the subprocess and its worker processes;
* ``load``: the 1-minute load average just before the run (other jobs on the machine skew the
  figures; ``--quiet-load X`` first waits, up to ``--quiet-timeout`` s, for a load below X).

The outputs of all worker counts are compared byte for byte. Figures are printed (and written
with ``--output-json``), never stored in this script. Bad flags: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import os
import platform
import re
import resource
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

from megatron_patch.errors import ArgumentError  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser, run_main  # noqa: E402

DEFAULT_INPUT = REPO_ROOT / ".data" / "train.jsonl.xz"  # git-ignored: where the corpora are copied


def parse_options(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="benchmarks/preprocess_throughput.py", description=__doc__.split("\n")[0])
    p.add_argument("--input", default=str(DEFAULT_INPUT), help="corpus (default .data/train.jsonl.xz in the checkout)")
    p.add_argument("--tokenizer-model", help="use this .model instead of training one")
    p.add_argument("--vocab-size", type=int, default=32000, help="of the trained tokenizer")
    p.add_argument("--tokenizer-sample-lines", type=int, default=300_000, help="lines sampled to train the tokenizer")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run")
    p.add_argument("--work-dir", help="keep the outputs here (default: a temporary folder, removed at the end)")
    p.add_argument("--quiet-load", type=float, help="wait for a 1-minute load average below this")
    p.add_argument("--quiet-timeout", type=float, default=900, help="longest wait, seconds")
    p.add_argument("--output-json", help="also write every figure here")
    opts = p.parse_args(argv)
    if not os.path.isfile(opts.input):
        raise ArgumentError(f"--input {opts.input} does not exist")
    if opts.tokenizer_model and not os.path.isfile(opts.tokenizer_model):
        raise ArgumentError(f"--tokenizer-model {opts.tokenizer_model} does not exist")
    if min(opts.workers) < 1:
        raise ArgumentError(f"--workers {opts.workers}: every count must be >= 1")
    return opts


def environment() -> dict:
    import megatron.core
    import numpy
    import sentencepiece
    import torch

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores), no GPU used",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "sentencepiece": sentencepiece.__version__,
        "numpy": numpy.__version__,
    }


def uncompressed_size(path: str) -> tuple[int, int]:
    """(bytes, lines) of the decompressed input."""
    from megatron_patch.data.compression import open_decompressed
    from megatron_patch.data.inputs import describe_file

    file = describe_file(path)
    stream, raw = open_decompressed(file.path, file.compression)
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
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / f"{name}.py"), *args], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"tools/{name}.py failed ({done.returncode}): {done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, wall, cpu


def wait_for_quiet(threshold: float | None, timeout: float) -> None:
    """Wait (up to ``timeout`` s) for other jobs on a shared machine to finish."""
    deadline = time.time() + timeout
    while threshold is not None and os.getloadavg()[0] >= threshold and time.time() < deadline:
        time.sleep(5)


def measure(opts, work: Path, size: int) -> tuple[dict, list[dict], bool]:
    """Train (or take) the tokenizer, run every worker count; returns (tokenizer, rows, same)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = {"model": opts.tokenizer_model, "trained": opts.tokenizer_model is None}
    if opts.tokenizer_model is None:
        prefix = work / f"spm{opts.vocab_size}"
        _, wall, _ = run_tool(
            "train_tokenizer",
            [
                "--input",
                opts.input,
                "--vocab-size",
                str(opts.vocab_size),
                "--input-sentence-size",
                str(opts.tokenizer_sample_lines),
                "--output-prefix",
                str(prefix),
                "--force",  # a --work-dir used before holds the last run's tokenizer
            ],
        )
        tokenizer.update(
            model=f"{prefix}.model",
            vocab_size=opts.vocab_size,
            sample_lines=opts.tokenizer_sample_lines,
            train_wall_s=wall,
        )
    rows, prefixes = [], []
    for workers in opts.workers:
        folder = work / f"workers{workers}"
        folder.mkdir(exist_ok=True)
        wait_for_quiet(opts.quiet_load, opts.quiet_timeout)
        load = os.getloadavg()[0]
        stdout, wall, cpu = run_tool(
            "preprocess_data",
            [
                "--input",
                opts.input,
                "--tokenizer-model",
                tokenizer["model"],
                "--append-eod",
                "--workers",
                str(workers),
                "--output-prefix",
                str(folder / "bench"),
                "--log-interval",
                "100000000",
            ],
        )
        seconds = float(re.search(r"^time: ([0-9.]+) s", stdout, re.M).group(1))
        prefixes.append(str(folder / "bench_text_document"))
        dataset = IndexedDataset(prefixes[-1])
        tokens = int(dataset.sequence_lengths.sum(dtype="int64"))
        del dataset
        rows.append(
            {
                "workers": workers,
                "tokens": tokens,
                "tool_s": seconds,
                "wall_s": wall,
                "cpu_s": cpu,
                "tokens_per_s": tokens / seconds,
                "mb_per_s": size / seconds / 1e6,
                "load_before": load,
            }
        )
    same = all(
        filecmp.cmp(prefixes[0] + ext, other + ext, shallow=False) for other in prefixes[1:] for ext in (".bin", ".idx")
    )
    return tokenizer, rows, same


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    return run_main(lambda: _preprocess_throughput(argv))


def _preprocess_throughput(argv: list[str]) -> int:
    opts = parse_options(argv)
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="preprocess-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    size, lines = uncompressed_size(opts.input)
    try:
        tokenizer, rows, same = measure(opts, work, size)
    finally:
        if not opts.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print(command_line("preprocess_throughput.py", argv))
    print(
        f"{env['date_utc']}; {env['device']}; Python {env['python']}, torch {env['torch']}, "
        f"megatron-core {env['megatron_core']}, sentencepiece {env['sentencepiece']}, "
        f"numpy {env['numpy']}"
    )
    print(f"input: {opts.input}, {size / 1e6:.1f} MB uncompressed, {lines} lines")
    if tokenizer["trained"]:
        print(
            f"tokenizer: BPE, vocab {tokenizer['vocab_size']}, trained on "
            f"{tokenizer['sample_lines']} sampled lines in {tokenizer['train_wall_s']:.1f} s "
            f"(wall, incl. start-up)"
        )
    else:
        print(f"tokenizer: {tokenizer['model']}")
    print()
    print("| workers | tokens | tool s | wall s | cpu s | tokens/s | MB/s | load before |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['workers']} | {r['tokens']} | {r['tool_s']:.1f} | {r['wall_s']:.1f} | "
            f"{r['cpu_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['mb_per_s']:.2f} | "
            f"{r['load_before']:.2f} |"
        )
    print(f"\noutputs byte-identical across worker counts: {same}")
    if opts.output_json:
        write_json(
            opts.output_json,
            {
                "command": command_line("preprocess_throughput.py", argv),
                "environment": env,
                "input_bytes": size,
                "input_lines": lines,
                "tokenizer": tokenizer,
                "rows": rows,
                "identical_outputs": same,
            },
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
