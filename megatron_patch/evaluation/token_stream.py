"""Evaluation text as one token stream, and the windows that score it.

The stream is built as training builds it: documents in order, each followed by EOD, plus one
EOD in front so that the first token of the first document is scored too (with EOD, the usual
document boundary, as its only context)::

    x = [EOD] doc_1 [EOD] doc_2 [EOD] ... doc_n [EOD]        (N + 1 tokens, N targets)

Target t (1 <= t <= N) is x[t] predicted from x[:t] inside a window of at most T tokens. Every
target is scored exactly once. Documents are not isolated from each other (as in training,
attention crosses EOD).

Windows (HF's "perplexity of fixed-length models" scheme): a window starting at ``begin`` reads
inputs ``x[begin : begin+len]`` and labels ``x[begin+1 : begin+len+1]`` and scores the labels
not scored by an earlier window.

* ``non-overlapping`` (stride = T): windows [0, T), [T, 2T), ...; a target is predicted from
  1 to T tokens of context, depending on its place in its window.
* ``sliding`` with stride S < T: windows start every S tokens and, after the first one, each
  scores only its last S labels, so every target outside the first window is predicted from at
  least T - S + 1 tokens (those of the first window from 1..T, as in non-overlapping).

Bytes (for bits per byte) are the UTF-8 bytes of the evaluated documents' text: of the JSON/text
input itself for ``--input``; of the detokenized documents for a ``.bin/.idx`` prefix. EOD adds
no byte, but its loss is part of the total, as in training.
"""

import logging
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from megatron_patch.errors import ArgumentError, DataError

logger = logging.getLogger(__name__)


@dataclass
class EvalCorpus:
    """The token stream of the evaluated documents.

    Attributes:
        stream: int64 ``[N + 1]`` token ids (see the module docstring).
        documents: documents evaluated (empty ones are skipped, as in preprocessing).
        text_bytes: UTF-8 bytes of their text.
        empty_skipped: empty documents skipped.
    """

    stream: np.ndarray
    documents: int
    text_bytes: int
    empty_skipped: int = 0

    @property
    def targets(self) -> int:
        """N, the number of scored tokens (EODs included)."""
        return len(self.stream) - 1


def _assemble(documents: List[np.ndarray], eod: int, text_bytes: int, empty: int, what: str) -> EvalCorpus:
    if not documents:
        raise DataError(f"{what} holds no non-empty document to evaluate: check the file and --json-keys")
    stream = np.concatenate([np.array([eod], dtype=np.int64)] + documents)
    return EvalCorpus(stream, len(documents), text_bytes, empty)


def corpus_from_prefix(prefix: str, tokenizer, max_documents: Optional[int] = None) -> EvalCorpus:
    """Documents of a ``.bin/.idx`` prefix as stored (preprocessed with ``--append-eod`` like the
    training data: an EOD is appended to a document only when it lacks one)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch.data.indexed import check_prefix

    check_prefix(prefix)
    try:
        dataset = IndexedDataset(prefix)
    except Exception as error:  # a truncated or foreign .idx
        raise DataError(
            f"--data-path {prefix}: unreadable ({type(error).__name__}: {error}); "
            f"re-create it with tools/preprocess_data.py"
        ) from None
    count = len(dataset) if max_documents is None else min(len(dataset), max_documents)
    documents, text_bytes, empty = [], 0, 0
    eod = tokenizer.eod
    for index in range(count):
        ids = np.asarray(dataset[index], dtype=np.int64)
        if len(ids) == 0 or (len(ids) == 1 and ids[0] == eod):
            empty += 1
            continue
        if ids.max() >= tokenizer.vocab_size:
            raise DataError(
                f"--data-path {prefix}: document {index} holds token id {int(ids.max())}, beyond the "
                f"tokenizer's {tokenizer.vocab_size} pieces: it was preprocessed with another tokenizer; "
                f"pass that one as --tokenizer-model"
            )
        body = ids[:-1] if ids[-1] == eod else ids
        text_bytes += len(tokenizer.detokenize(body.tolist()).encode("utf-8"))
        documents.append(ids if ids[-1] == eod else np.append(ids, eod))
    return _assemble(documents, eod, text_bytes, empty, f"--data-path {prefix}")


def corpus_from_files(
    patterns: Sequence[str], tokenizer, json_key: str = "text", max_documents: Optional[int] = None
) -> EvalCorpus:
    """Documents of JSONL / text files (one line = one document; .gz/.xz/.zst allowed), tokenized
    and each followed by EOD."""
    from megatron_patch.data.inputs import BadLineError, expand_inputs, iter_lines, parse_line

    files = expand_inputs(list(patterns))
    documents, text_bytes, empty = [], 0, 0
    eod = tokenizer.eod
    for read, (file_index, line_number, raw, _) in enumerate(iter_lines(files)):
        if max_documents is not None and read >= max_documents:  # empty ones count, as in a prefix
            break
        file = files[file_index]
        try:
            text = parse_line(raw, file.format, [json_key])[json_key]
        except BadLineError as error:
            raise DataError(f"{file.path}, line {line_number}: {error.reason}; {error.fix}") from None
        if not text:
            empty += 1
            continue
        text_bytes += len(text.encode("utf-8"))
        documents.append(np.array(tokenizer.tokenize(text) + [eod], dtype=np.int64))
    return _assemble(documents, eod, text_bytes, empty, "--input " + " ".join(patterns))


@dataclass(frozen=True)
class Window:
    """Inputs ``x[begin : begin+length]``; labels ``j >= scored_from`` of it are scored."""

    begin: int
    length: int
    scored_from: int


def windows(num_targets: int, seq_length: int, stride: int) -> Iterator[Window]:
    """Windows that score each of ``num_targets`` targets exactly once (see the module docstring)."""
    if not 1 <= stride <= seq_length:
        raise ArgumentError(f"--stride {stride} must lie in [1, --seq-length {seq_length}]")
    scored_until, begin = 0, 0
    while scored_until < num_targets:
        end = min(begin + seq_length, num_targets)
        yield Window(begin, end - begin, scored_until - begin)
        scored_until = end
        begin += stride


def micro_batch(stream: np.ndarray, chunk: Sequence[Optional[Window]], seq_length: int, pad: int) -> dict:
    """``{tokens, labels, loss_mask}`` ``[b, T]`` of windows (None: an empty, unscored row);
    short windows are padded at the end (causal attention: padding never reaches a scored label)."""
    size = len(chunk)
    tokens = torch.full((size, seq_length), pad, dtype=torch.long)
    labels = torch.full((size, seq_length), pad, dtype=torch.long)
    loss_mask = torch.zeros(size, seq_length, dtype=torch.float32)
    for row, window in enumerate(chunk):
        if window is None:
            continue
        piece = torch.from_numpy(stream[window.begin : window.begin + window.length + 1])
        tokens[row, : window.length] = piece[:-1]
        labels[row, : window.length] = piece[1:]
        loss_mask[row, window.scored_from : window.length] = 1.0
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
