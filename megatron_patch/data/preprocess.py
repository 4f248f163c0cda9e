"""Tokenize a corpus into megatron.core ``IndexedDataset`` files (the engine of
``tools/preprocess_data.py``).

Pipeline: the main process reads lines (one line = one document, see
:mod:`megatron_patch.data.inputs`), groups them into chunks of about ``chunk_bytes`` bytes of
one file, and hands the chunks to a process pool (``workers`` > 1; ``concurrent.futures``, whose
pool reports a worker killed by a signal, where ``multiprocessing.Pool`` waits for its lost task
for ever) or encodes them itself (``workers`` = 1). Results are taken back **in submission
order** through a bounded window of ``4 * workers`` chunks in flight, so the output is
byte-identical for any worker count and memory stays bounded for any input size. Each document
becomes one sequence of token ids (``+ [eod]`` with ``append_eod``) written with
``IndexedDatasetBuilder`` in the dtype ``DType.optimal_dtype(vocab_size)`` (uint16 below 65500
pieces, else int32).

Empty documents (a text that encodes to no token; it gets no EOD either) are kept as Megatron-LM's
``tools/preprocess_data.py`` keeps them: an entry in the index's ``document_indices`` that holds
no sequence (no ``sequence_lengths`` entry, no bytes in ``.bin``), so the pair is byte-identical
to Megatron-LM's. GPT datasets index sequences, so such an entry is never sampled. With
``skip_empty_documents`` the index has no entry for them. Either way they are counted.

With ``partitions`` = N > 1 the lines are counted first and line ``j`` of ``L`` goes to shard
``j * N // L`` (contiguous, in order); each shard is its own pair, and the shards are then merged
into the unsharded pair (unless ``merge_partitions`` is False), which equals a run with N = 1
byte for byte. A shard without a document with text gets a warning. The lines of each file are
read as counted, or the input changed meanwhile (a download still running): an error. Everything
is staged in a temporary folder and renamed only once complete.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Iterator

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_patch.data.indexed import dataset_prefix, merge_datasets, verify_dataset
from megatron_patch.data.inputs import (
    BadLineError,
    check_text_keys,
    count_lines_per_file,
    expand_inputs,
    iter_lines,
    parse_line,
)
from megatron_patch.data.staging import StagedOutputs, output_folder
from megatron_patch.errors import DataError, ProcessDiedError

logger = logging.getLogger(__name__)


@dataclass
class PreprocessConfig:
    """Options of :func:`preprocess`; the names match the flags of ``tools/preprocess_data.py``."""

    input: list[str]
    output_prefix: str
    tokenizer_model: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    workers: int = 1
    append_eod: bool = False
    log_interval: int = 1000
    partitions: int = 1
    merge_partitions: bool = True
    skip_bad_lines: bool = False
    skip_empty_documents: bool = False
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise DataError(f"--workers {self.workers} must be >= 1 (e.g. the number of cores)")
        if self.partitions < 1:
            raise DataError(f"--partitions {self.partitions} must be >= 1")
        if self.log_interval < 1:
            raise DataError(f"--log-interval {self.log_interval} must be >= 1 (documents)")
        if self.chunk_bytes < 1:
            raise DataError(f"--chunk-bytes {self.chunk_bytes} must be >= 1 (default {1 << 20}: 1 MiB per task)")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise DataError(f"--json-keys {self.json_keys} must be non-empty and distinct")


@dataclass
class KeyReport:
    """Per-key counts: ``documents`` with text (one sequence each) and their ``tokens`` (EODs
    included); ``empty`` documents (kept as index entries, or skipped with
    ``skip_empty_documents``)."""

    documents: int = 0
    tokens: int = 0
    empty: int = 0


@dataclass
class PreprocessReport:
    """What :func:`preprocess` did; ``input_bytes`` counts uncompressed line bytes."""

    lines: int = 0
    bad_lines_skipped: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    keys: dict[str, KeyReport] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)


class _Encoder:
    """Worker-side state: a SentencePiece processor and the options; encodes one chunk."""

    def __init__(self, model_path: str, keys: list[str], append_eod: bool, dtype_name: str):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.eod = self.processor.eos_id()
        self.keys = keys
        self.append_eod = append_eod
        self.dtype = numpy.dtype(dtype_name)

    def encode(self, fmt: str, lines: list[bytes]) -> list[tuple]:
        """Per line: ``("ok", [ids per key as numpy arrays])`` or ``("bad", reason, fix)``."""
        results: list[tuple] = []
        texts: list[str] = []
        for raw in lines:
            try:
                record = parse_line(raw, fmt, self.keys)
            except BadLineError as err:
                results.append(("bad", err.reason, err.fix))
                continue
            results.append(("ok", len(texts)))
            texts.extend(record[key] for key in self.keys)
        # parse_line returns valid Unicode only (a lone surrogate escape is a bad line there)
        ids = self.processor.encode(texts, out_type=int, num_threads=1) if texts else []
        out = []
        for result in results:
            if result[0] == "bad":
                out.append(result)
                continue
            first = result[1]
            arrays = []
            for part in ids[first : first + len(self.keys)]:
                if part and self.append_eod:
                    part = part + [self.eod]
                arrays.append(numpy.asarray(part, dtype=self.dtype))
            out.append(("ok", arrays))
        return out


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(*args) -> None:
    global _WORKER_ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to report, in one line
    _WORKER_ENCODER = _Encoder(*args)


def _encode_in_worker(fmt: str, lines: list[bytes]) -> list[tuple]:
    return _WORKER_ENCODER.encode(fmt, lines)


def _ordered(chunks: Iterator, encoder_args: tuple, workers: int) -> Iterator:
    """Yield ``(meta, encoded chunk)`` in input order, encoding in ``workers`` processes."""
    if workers == 1:
        encoder = _Encoder(*encoder_args)
        for meta, fmt, lines in chunks:
            yield meta, encoder.encode(fmt, lines)
        return
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=encoder_args)
    try:
        pending: deque = deque()
        for meta, fmt, lines in chunks:
            pending.append((meta, pool.submit(_encode_in_worker, fmt, lines)))
            if len(pending) >= 4 * workers:
                meta, result = pending.popleft()
                yield meta, result.result()
        while pending:
            meta, result = pending.popleft()
            yield meta, result.result()
    except BrokenProcessPool:
        raise ProcessDiedError(
            f"a tokenizing worker process died (killed by a signal, e.g. the out-of-memory killer with "
            f"--workers {workers}, or it failed to start): nothing was written; re-run with fewer --workers "
            f"or more memory"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks(files, chunk_bytes: int) -> Iterator:
    """Group lines of one file into chunks of about ``chunk_bytes`` uncompressed bytes.

    Yields ``((file index, first line number, disk bytes read, chunk bytes), fmt, [lines])``.
    """
    lines: list[bytes] = []
    size = 0
    meta: list[int] = []
    for index, line_number, raw, disk_bytes in iter_lines(files):
        if lines and (index != meta[0] or size >= chunk_bytes):
            yield tuple(meta), files[meta[0]].format, lines
            lines, size = [], 0
        if not lines:
            meta = [index, line_number, disk_bytes, 0]
        lines.append(raw)
        size += len(raw)
        meta[2], meta[3] = disk_bytes, size
    if lines:
        yield tuple(meta), files[meta[0]].format, lines


def _format_eta(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """Progress line every ``interval`` documents: docs, MB/s, tokens/s, ETA from disk bytes."""

    def __init__(self, interval: int, total_disk_bytes: int) -> None:
        self.interval = interval
        self.total = total_disk_bytes
        self.start = time.time()
        self.next = interval

    def update(self, report: "PreprocessReport", disk_bytes: int) -> None:
        if report.lines < self.next:
            return
        self.next = (report.lines // self.interval + 1) * self.interval
        elapsed = max(time.time() - self.start, 1e-9)
        tokens = sum(k.tokens for k in report.keys.values())
        eta = ""
        if self.total > 0 and disk_bytes > 0:
            fraction = min(disk_bytes / self.total, 1.0)
            eta = f", {100 * fraction:.0f}% read, ETA {_format_eta(elapsed / fraction - elapsed)}"
        logger.info(
            "%d documents, %.2f MB/s, %.0f tokens/s%s",
            report.lines,
            report.input_bytes / elapsed / 1e6,
            tokens / elapsed,
            eta,
        )


class _Writers:
    """One ``IndexedDatasetBuilder`` per (shard, key), writing into the staging folder."""

    def __init__(self, staged: StagedOutputs, config: PreprocessConfig, shards: list, dtype):
        self.staged = staged
        self.config = config
        self.shards = shards
        self.prefixes: dict[tuple, str] = {}
        self.builders: dict[tuple, IndexedDatasetBuilder] = {}
        self.counts: dict[tuple, list[int]] = {}
        for shard in shards:
            for key in config.json_keys:
                prefix = dataset_prefix(config.output_prefix, key, shard)
                self.prefixes[shard, key] = self._stage(prefix)
                self.builders[shard, key] = IndexedDatasetBuilder(self.prefixes[shard, key] + ".bin", dtype=dtype)
                self.counts[shard, key] = [0, 0, 0]  # sequences, tokens, index documents

    def _stage(self, prefix: str) -> str:
        """Stage ``prefix.bin`` then ``prefix.idx`` (renamed in this order); returns the staged
        prefix."""
        staged_bin = self.staged.path(prefix + ".bin")
        self.staged.path(prefix + ".idx")
        return staged_bin[: -len(".bin")]

    def add(self, shard, key: str, ids: numpy.ndarray) -> None:
        """Append one document of ``ids.size`` tokens: one sequence, or none when it is empty
        (Megatron-LM's tool passes no sequence length for an empty document)."""
        self.builders[shard, key].add_document(ids, [ids.size] if ids.size else [])
        counts = self.counts[shard, key]
        counts[0] += 1 if ids.size else 0
        counts[1] += ids.size
        counts[2] += 1

    def close(self) -> None:
        """Close the open ``.bin`` files (after an error; ``finalize`` closes them otherwise)."""
        for builder in self.builders.values():
            builder.data_file.close()

    def finish(self, report: PreprocessReport) -> None:
        """Write the indices, read every pair back, and merge the shards when asked to."""
        for (shard, key), builder in self.builders.items():
            builder.finalize(self.prefixes[shard, key] + ".idx")
            verify_dataset(self.prefixes[shard, key], *self.counts[shard, key])
            if shard is not None and self.counts[shard, key][0] == 0:
                lines = _first_line(shard + 1, len(self.shards), report.lines) - _first_line(
                    shard, len(self.shards), report.lines
                )
                logger.warning(
                    "shard %s holds no document with text (its %d input lines were all bad lines skipped or empty "
                    "documents): training draws no sample from it; leave it out of the data blend, or use fewer "
                    "--partitions",
                    dataset_prefix(self.config.output_prefix, key, shard),
                    lines,
                )
        if len(self.shards) > 1 and self.config.merge_partitions:
            for key, stats in report.keys.items():
                merged = self._stage(dataset_prefix(self.config.output_prefix, key))
                parts = [self.prefixes[shard, key] for shard in self.shards]
                merge_datasets(parts, merged + ".bin", merged + ".idx")
                documents = sum(self.counts[shard, key][2] for shard in self.shards)
                verify_dataset(merged, stats.documents, stats.tokens, documents)


def _first_line(shard: int, shards: int, lines: int) -> int:
    """Index of the first of ``lines`` lines in ``shard`` of ``shards``: the least ``j`` with
    ``j * shards // lines == shard``, i.e. ``ceil(shard * lines / shards)``."""
    return -(-shard * lines // shards)


def preprocess(config: PreprocessConfig) -> PreprocessReport:
    """Tokenize ``config.input`` into ``{output_prefix}_{key}_document.{bin,idx}`` (see module doc).

    Raises:
        DataError: bad input (missing file, bad line without ``skip_bad_lines``, missing output
            folder, unreadable tokenizer, no document with text). Nothing is left behind then.
    """
    start = time.time()
    from megatron_patch.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(config.tokenizer_model)  # DataError (one line) when unreadable
    folder = output_folder(config.output_prefix)
    shards = list(range(config.partitions)) if config.partitions > 1 else [None]
    files = expand_inputs(config.input)
    check_text_keys(files, config.json_keys)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    counted = count_lines_per_file(files) if config.partitions > 1 else None
    total_lines = sum(counted) if counted else 0
    if config.partitions > 1 and config.partitions > total_lines:
        raise DataError(
            f"--partitions {config.partitions} exceeds the {total_lines} input lines; "
            f"use at most {total_lines} partitions"
        )
    read = [0] * len(files)  # lines read per file, to compare with ``counted``
    report = PreprocessReport(keys={key: KeyReport() for key in config.json_keys})
    progress = _Progress(config.log_interval, sum(f.size for f in files))
    encoder_args = (config.tokenizer_model, config.json_keys, config.append_eod, dtype.__name__)
    with StagedOutputs(folder, "preprocess") as staged:
        writers = _Writers(staged, config, shards, dtype)
        results = _ordered(_chunks(files, config.chunk_bytes), encoder_args, config.workers)
        try:
            for (file_index, first_line, disk_bytes, size), encoded in results:
                read[file_index] += len(encoded)
                if counted and read[file_index] > counted[file_index]:
                    raise _changed(files[file_index].path, counted[file_index], f"at least {read[file_index]}")
                for offset, result in enumerate(encoded):
                    # line j of L goes to shard j * N // L (contiguous, in order)
                    shard = shards[report.lines * len(shards) // total_lines if total_lines else 0]
                    report.lines += 1
                    if result[0] == "bad":
                        if not config.skip_bad_lines:
                            raise DataError(
                                f"{files[file_index].path}:{first_line + offset}: {result[1]}; "
                                f"{result[2]}, or pass --skip-bad-lines to skip such lines"
                            )
                        report.bad_lines_skipped += 1
                        continue
                    for key, ids in zip(config.json_keys, result[1]):
                        stats = report.keys[key]
                        if ids.size == 0:
                            stats.empty += 1
                            if config.skip_empty_documents:
                                continue
                        writers.add(shard, key, ids)
                        stats.documents += 1 if ids.size else 0
                        stats.tokens += int(ids.size)
                    progress.update(report, disk_bytes)
                report.input_bytes += size
        except BaseException:
            writers.close()
            raise
        finally:
            results.close()
        for file, lines, expected in zip(files, read, counted or []):
            if lines != expected:
                writers.close()
                raise _changed(file.path, expected, str(lines))
        for key, stats in report.keys.items():
            if stats.documents == 0:
                raise DataError(
                    f"no document with text under key '{key}' in {report.lines} input lines "
                    f"({stats.empty} empty, {report.bad_lines_skipped} bad); check "
                    f"--input and --json-keys"
                )
        writers.finish(report)
        report.outputs = staged.commit()
    report.seconds = time.time() - start
    return report


def _changed(path: str, counted: int, read: str) -> DataError:
    return DataError(
        f"input '{path}' changed while it was read (counted {counted} lines, then read {read}); wait until it is "
        f"complete (a download or copy still running) and re-run"
    )
