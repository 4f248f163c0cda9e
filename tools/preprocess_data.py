"""Tokenize JSONL / text corpora into megatron.core IndexedDataset files (.bin + .idx).

Example (Megatron's flag names)::

    python tools/preprocess_data.py --input corpus/train.jsonl.xz \\
        --tokenizer-model tokenizers/spm32k.model --output-prefix data/train \\
        --append-eod --workers 2

writes ``data/train_text_document.bin`` and ``.idx`` (one pair per ``--json-keys`` key). One
input line is one document. The pair is byte-identical to Megatron-LM's ``tools/preprocess_data.py``
with the same SentencePiece model, also for empty documents (a text that encodes to no token): as
there, each keeps an entry in the index's document list that holds no sequence and no token (no
EOD either), which GPT training never samples; ``--skip-empty-documents`` leaves them out of the
index. Empty documents are counted either way. With ``--partitions N``
the input is cut into N contiguous shards, written as ``{prefix}_{i}_{key}_document``, and merged
into ``{prefix}_{key}_document`` (skip the merge with ``--no-merge-partitions``). Outputs are
written under temporary names and renamed only when complete; on any error nothing is left. A
run refuses to start beside earlier outputs of its prefix and keys that it would not replace
(shards of a run with more partitions, or any shard next to an unsharded run, a merged pair next
to ``--no-merge-partitions`` shards): they would pass for part of its output (a folder merge
would take stale shards in). It never deletes them: remove them, or choose another ``--output-prefix``.
See ``megatron_patch/data/preprocess.py`` for the details.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings

if __package__ in (None, ""):  # run as `python tools/preprocess_data.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.data.staging import NAME_MAX  # noqa: E402
from megatron_patch.errors import ArgumentError, DataError  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser, run_main  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="tools/preprocess_data.py", description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True, help="files or quoted globs")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize")
    group.add_argument(
        "--skip-bad-lines", action="store_true", help="skip (and count) malformed lines instead of stopping"
    )
    group.add_argument(
        "--skip-empty-documents",
        action="store_true",
        help="leave documents without a token out of the index (by default each "
        "keeps an empty entry, as Megatron-LM's preprocess_data.py writes)",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    group.add_argument("--append-eod", action="store_true", help="end each document with </s>")
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx; its folder must exist"
    )
    group.add_argument("--partitions", type=int, default=1, help="number of output shards")
    group.add_argument(
        "--no-merge-partitions",
        dest="merge_partitions",
        action="store_false",
        help="with --partitions > 1, keep only the shards",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=1000, help="documents per progress line")
    group.add_argument(
        "--chunk-bytes", type=int, default=1 << 20, help="bytes of text per worker task (does not change the output)"
    )
    args = parser.parse_args(argv)
    check_json_keys(args.json_keys, args.output_prefix, args.partitions)
    if args.partitions > 1 and args.merge_partitions:
        check_merge_names(args.json_keys, args.output_prefix, args.partitions)
    return args


def check_json_keys(keys: list[str], output_prefix: str, partitions: int) -> None:
    """ArgumentError for a ``--json-keys`` key that cannot be part of the output file names
    ``PREFIX_{key}_document.bin`` (``PREFIX_{shard}_{key}_document.bin`` with ``--partitions``):
    one holding a path separator or NUL, or one that makes a name longer than NAME_MAX bytes.
    Checked before any input is read, since the outputs are named only when writing starts."""
    from megatron_patch.data.indexed import dataset_prefix

    forbidden = [c for c in ("/", os.altsep, "\0") if c]
    for key in keys:
        found = [c for c in forbidden if c in key]
        if found:
            safe = "".join("_" if c in forbidden else c for c in key)
            raise ArgumentError(
                f"--json-keys {key!r}: the key is part of the output file names (PREFIX_{{key}}_document.bin) "
                f"and cannot hold {found[0]!r}; rename the key in the input files, e.g. to {safe!r}"
            )
        longest = os.path.basename(dataset_prefix(output_prefix, key, partitions - 1 if partitions > 1 else None))
        size = len(os.fsencode(longest + ".bin"))
        if size > NAME_MAX:
            raise ArgumentError(
                f"--json-keys {key[:40]!r}...: the output file name {longest[:60]}... would be {size} bytes, "
                f"over the {NAME_MAX} a file name may have; shorten the key (rename it in the input files) "
                f"or the file name part of --output-prefix"
            )


def check_merge_names(keys: list[str], output_prefix: str, partitions: int) -> None:
    """ArgumentError for two ``--json-keys`` whose outputs get the same name with ``--partitions``:
    the merge ``PREFIX_{key}_document`` of one and a shard ``PREFIX_{shard}_{key}_document`` of the
    other (keys ``0_a`` and ``a``). Checked before any input is read."""
    from megatron_patch.data.indexed import dataset_prefix

    merged = {dataset_prefix(output_prefix, key): key for key in keys}
    for key in keys:
        for shard in range(partitions):
            name = dataset_prefix(output_prefix, key, shard)
            if name in merged:
                raise ArgumentError(
                    f"--json-keys '{merged[name]}' and '{key}' would both write {name}.bin with --partitions "
                    f"{partitions} (the merge of key '{merged[name]}' and shard {shard} of key '{key}'); rename one "
                    f"key in the input files, or pass --no-merge-partitions"
                )


def check_stale_outputs(keys: list[str], output_prefix: str, partitions: int, merge_partitions: bool) -> None:
    """DataError naming earlier pairs of ``output_prefix`` and ``keys`` in its folder that this run
    would not replace but that would pass for part of its output: shards ``PREFIX_{i}_{key}_document``
    it does not write, and with ``--no-merge-partitions`` the merge ``PREFIX_{key}_document``. A
    missing folder is left to the run to report."""
    from megatron_patch.data.indexed import dataset_prefix, natural_key

    folder = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(folder):
        return
    shards = range(partitions) if partitions > 1 else [None]
    written = {os.path.basename(dataset_prefix(output_prefix, key, shard)) for shard in shards for key in keys}
    if partitions > 1 and merge_partitions:
        written.update(os.path.basename(dataset_prefix(output_prefix, key)) for key in keys)
    ours = re.compile(
        rf"{re.escape(os.path.basename(output_prefix))}(_\d+)?_({'|'.join(map(re.escape, keys))})_document"
    )
    names = {name[: -len(".bin")] for name in os.listdir(folder) if name.endswith((".bin", ".idx"))}

    def earlier_output(name: str) -> bool:
        """A pair of this prefix and a key: merged, or a shard of a set that has its shard 0 (so that
        another dataset named PREFIX_2023 is not taken for shard 2023)."""
        match = ours.fullmatch(name)
        if not match or name in written:
            return False
        return match.group(1) is None or os.path.basename(dataset_prefix(output_prefix, match.group(2), 0)) in names

    stale = sorted(filter(earlier_output, names), key=natural_key)
    if stale:
        shown = ", ".join(stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
        raise DataError(
            f"output folder '{folder}' holds {len(stale)} earlier output pair(s) of --output-prefix '{output_prefix}' "
            f"that this run (--partitions {partitions}{'' if merge_partitions else ', --no-merge-partitions'}) would "
            f"not replace: {shown} (.bin/.idx); left next to its outputs they would pass for part of them; remove "
            f"them or choose another --output-prefix"
        )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron_patch").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    return run_main(lambda: _preprocess(argv), io_errors_are_user_errors=True)


def _preprocess(argv: list[str] | None) -> None:
    args = parse_args(argv)
    check_stale_outputs(args.json_keys, args.output_prefix, args.partitions, args.merge_partitions)
    from megatron_patch.data.preprocess import PreprocessConfig, preprocess

    report = preprocess(PreprocessConfig(**vars(args)))
    tokens = sum(k.tokens for k in report.keys.values())
    seconds = max(report.seconds, 1e-9)
    print(f"lines read: {report.lines}, bad lines skipped: {report.bad_lines_skipped}")
    for key, stats in report.keys.items():
        print(
            f"key '{key}': {stats.documents} documents, {stats.tokens} tokens"
            f"{' (with EOD)' if args.append_eod else ''}, {stats.empty} empty "
            f"{'skipped' if args.skip_empty_documents else 'kept as empty index entries'}"
        )
    print(
        f"time: {report.seconds:.2f} s, {report.input_bytes / seconds / 1e6:.2f} MB/s of text, "
        f"{tokens / seconds:.0f} tokens/s, {args.workers} worker(s)"
    )
    for path in report.outputs:
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
