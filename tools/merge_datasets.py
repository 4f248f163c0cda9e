"""Merge IndexedDataset pairs (.bin + .idx) into one pair, in the order given.

Examples::

    python tools/merge_datasets.py --input data/train_0_text_document data/train_1_text_document \\
        --output-prefix data/train_text_document
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document

``--input`` takes prefixes (without .bin/.idx), each once, or one folder, whose pairs are merged in
natural name order (``x_2`` before ``x_10``). ``--output-prefix`` is the full prefix of the merged
pair; its folder must exist, and it must not name an input pair. An existing pair there is
replaced only with ``--force``. The merged pair is written under temporary names and renamed when
complete. Documents keep their order, so merging
the shards of ``tools/preprocess_data.py --partitions N --no-merge-partitions`` gives the same
bytes as a run without partitions (without ``--no-merge-partitions`` that tool merges its shards
itself).

A folder must hold one corpus: it is refused when it holds partition shards next to their
merge (``x_0_text_document`` ... and ``x_text_document``: every document would be merged twice)
or pairs of several JSON keys (``x_text_document`` and ``x_title_document``); pass the prefixes
explicitly then. The report counts documents (index entries, empty ones included), sequences
(what GPT training samples: one per document with tokens) and tokens.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

if __package__ in (None, ""):  # run as `python tools/merge_datasets.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.errors import ArgumentError, DataError  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser, run_main  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="tools/merge_datasets.py", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="prefixes, or one folder")
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged .bin/.idx (see --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing merged .bin/.idx")
    args = parser.parse_args(argv)
    if args.output_prefix.endswith((".bin", ".idx")):
        raise ArgumentError(
            f"--output-prefix '{args.output_prefix}' ends with {args.output_prefix[-4:]}, and the merge would be "
            f"written as {os.path.basename(args.output_prefix)}.bin; give the prefix without .bin/.idx"
        )
    return args


def resolve_inputs(inputs: list[str], output_prefix: str) -> list[str]:
    """Prefixes to merge: the given ones, each once, or the pairs found in one folder, which must
    be one corpus (``check_one_corpus``) and must not hold the output pair."""
    from megatron_patch.data.indexed import check_one_corpus, check_prefix, prefixes_in_folder
    from megatron_patch.data.inputs import note_named_once

    # a prefix's own folder (megatron's index cache, PREFIX/cache) does not make it a folder input
    folders = [path for path in inputs if os.path.isdir(path) and not os.path.isfile(path + ".bin")]
    if folders and len(inputs) > 1:
        raise DataError(
            f"--input '{folders[0]}' is a folder among {len(inputs)} inputs, but only one folder is accepted, "
            f"alone; merge one folder, or pass the prefixes to merge (--input PREFIX [PREFIX ...])"
        )
    if folders:
        prefixes = prefixes_in_folder(folders[0])
        if not prefixes:
            raise DataError(f"folder '{folders[0]}' holds no .bin/.idx pair to merge; check --input")
        for prefix in prefixes:
            if _same_pair(prefix, output_prefix):
                raise DataError(
                    f"folder '{folders[0]}' holds the pair {os.path.basename(prefix)} that --output-prefix "
                    f"'{output_prefix}' would overwrite; choose another --output-prefix (another name or folder)"
                )
        check_one_corpus(folders[0], prefixes)
        return prefixes
    named: dict[str, str] = {}  # realpath of the .bin -> the prefix that named it
    for prefix in inputs:
        if prefix.endswith((".bin", ".idx")):
            raise DataError(f"--input '{prefix}': give the prefix without .bin/.idx")
        check_prefix(prefix)
        if _same_pair(prefix, output_prefix):
            raise DataError(
                f"--output-prefix '{output_prefix}' would overwrite the input pair --input '{prefix}'; choose "
                f"another --output-prefix (another name or folder)"
            )
        note_named_once(named, prefix, os.path.realpath(prefix + ".bin"), "prefix")
    return list(inputs)


def _same_pair(prefix: str, output_prefix: str) -> bool:
    """Whether writing ``output_prefix`` would replace a file of the pair ``prefix`` (its .bin or
    .idx, compared by realpath: a link or another spelling of the path is the same file)."""
    inputs = {os.path.realpath(prefix + ext) for ext in (".bin", ".idx")}
    return any(os.path.realpath(output_prefix + ext) in inputs for ext in (".bin", ".idx"))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    return run_main(lambda: _merge(argv), io_errors_are_user_errors=True)


def _merge(argv: list[str] | None) -> None:
    args = parse_args(argv)
    from megatron_patch.data.indexed import merge_datasets, verify_dataset
    from megatron_patch.data.staging import StagedOutputs, check_outputs, output_folder

    start = time.time()
    folder = output_folder(args.output_prefix)
    prefixes = resolve_inputs(args.input, args.output_prefix)  # refuses an output that is an input pair
    check_outputs([args.output_prefix + ".bin", args.output_prefix + ".idx"], args.force)
    with StagedOutputs(folder, "merge_datasets", force=args.force) as staged:
        bin_path = staged.path(args.output_prefix + ".bin")
        idx_path = staged.path(args.output_prefix + ".idx")
        counts = merge_datasets(prefixes, bin_path, idx_path)
        verify_dataset(bin_path[: -len(".bin")], counts.sequences, counts.tokens, counts.documents)
        paths = staged.commit()
    print(
        f"merged {len(prefixes)} datasets: {counts.documents} documents ({counts.empty} of them empty), "
        f"{counts.sequences} sequences, {counts.tokens} tokens"
    )
    for prefix in prefixes:
        print(f"  from {prefix}")
    print(f"wrote {' and '.join(paths)} in {time.time() - start:.1f} s")
    for path in staged.replaced:
        print(f"replaced {path}")


if __name__ == "__main__":
    sys.exit(main())
