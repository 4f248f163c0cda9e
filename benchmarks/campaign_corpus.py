"""The campaign's prepared corpus (``gpu_campaign.py --prepare``): a tokenizer and a ``.bin/.idx`` of
just enough documents for the cost part, built on CPU with the project's own tools, so the device
call carries tens of MiB instead of the corpus and spends no time preprocessing.

Nothing here runs a model or imports the package beyond its errors: a corpus or folder that cannot
be used is a ``DataError`` (one ``error:`` line, exit code 2). Units: tokens, documents, bytes, MiB.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import List, Tuple

from common import MIB

from megatron_patch.errors import DataError

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
            raise DataError(f"{prefix}.idx is not a megatron index")
        _version, code, sequences, _documents = struct.unpack("<QBQQ", f.read(25))
        lengths = array("i")
        lengths.frombytes(f.read(4 * sequences))
    if os.path.getsize(f"{prefix}.bin") != sum(lengths) * IDX_ITEMSIZE[code]:
        raise DataError(f"{prefix}.bin does not hold the {sum(lengths)} tokens its index lists")
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
        raise DataError(f"--corpus {corpus}: decompress it first, or recompress it with xz")
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
        raise DataError(f"{args[0]} failed (exit {done.returncode}): {last}")
    print(f"{args[0]}: {time.monotonic() - started:.1f} s", flush=True)


def prepare_corpus(corpus: Path, data_dir: Path, vocab_size: int, plan: dict, cpu: bool, argv: List[str], repo: Path):
    """Train a SentencePiece tokenizer on ``corpus`` and preprocess its first documents, as many as
    one pass of the cost runs of ``plan`` (steps, global_batch, seq_length) needs with 5% to spare,
    into ``data_dir`` (built beside it under a temporary name, renamed when complete); returns the
    manifest, also written as ``data_dir/manifest.json``."""
    if (data_dir / MANIFEST).exists():
        try:
            manifest = json.loads((data_dir / MANIFEST).read_text())
        except ValueError as error:  # not JSON
            raise DataError(f"--data-dir {data_dir}: {MANIFEST} is not JSON ({error}): remove it first") from None
        if (manifest["plan"], manifest["vocab_size"], manifest["cpu"]) == (plan, vocab_size, cpu):
            print(f"{data_dir}: already prepared ({manifest['tokens']:,} tokens)")
            return manifest
        raise DataError(f"--data-dir {data_dir} holds data prepared with other settings: remove it first")
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise DataError(f"--data-dir {data_dir} exists and is not a prepared folder: remove it or name a new one")
    if not corpus.is_file():
        raise DataError(f"--corpus {corpus}: no such file")
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
