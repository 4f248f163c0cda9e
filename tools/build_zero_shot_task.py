"""Build the shipped zero-shot task ``tiny_next_sentence`` from a JSONL corpus.

The corpus is by default the bundled ``examples/data/tiny.jsonl.xz``.

Each item is a passage of consecutive sentences from one document (the context, 100-300
characters), the sentence that follows it in that document, and ``--choices - 1`` distractor
sentences of similar length (0.75-1.33x characters), each from a different other document. The
choices are shuffled; ``label`` is the index of the true continuation. A model scores each
choice by its log-likelihood after the context (lm-evaluation-harness ``multiple_choice``), so
chance is 1/``--choices``. Everything is drawn from one seeded generator: the same corpus and
flags give the same file, byte for byte. Example::

    python tools/build_zero_shot_task.py   # rewrites megatron_patch/evaluation/tasks/tiny_next_sentence/*.jsonl

Exit codes: 0 ok, 2 bad input.
"""

import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as `python tools/build_zero_shot_task.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INPUT = os.path.join(REPO_ROOT, "examples", "data", "tiny.jsonl.xz")
DEFAULT_OUTPUT = os.path.join(
    REPO_ROOT, "megatron_patch", "evaluation", "tasks", "tiny_next_sentence", "tiny_next_sentence.jsonl"
)


def build_parser():
    from megatron_patch.runtime.command import ArgumentParser

    parser = ArgumentParser(prog="build_zero_shot_task.py", description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=DEFAULT_INPUT, help="JSONL corpus, one document per line (.xz/.gz ok)")
    parser.add_argument("--json-key", default="text", help="the JSON key holding a document's text")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="the task's JSONL (replaced atomically)")
    parser.add_argument("--items-per-document", type=int, default=2, help="items drawn from each document")
    parser.add_argument("--choices", type=int, default=4, help="choices per item (1 true + distractors)")
    parser.add_argument("--seed", type=int, default=1234)
    return parser


def _documents(path: str, key: str) -> List[str]:
    from megatron_patch.data.inputs import BadLineError, expand_inputs, iter_lines, parse_line
    from megatron_patch.errors import DataError

    documents = []
    files = expand_inputs([path])
    for index, line_number, raw, _ in iter_lines(files):
        try:
            documents.append(parse_line(raw, files[index].format, [key], key_flag="--json-key")[key])
        except BadLineError as error:
            raise DataError(f"{files[index].path}:{line_number}: {error.reason}; {error.fix}") from None
    return documents


def _run(args) -> None:
    import json

    from megatron_patch.data.staging import output_folder
    from megatron_patch.errors import ArgumentError, DataError
    from megatron_patch.evaluation.next_sentence import build_items
    from megatron_patch.runtime import atomic_file

    if args.items_per_document < 1:
        raise ArgumentError(f"--items-per-document {args.items_per_document} must be >= 1")
    if args.choices < 2:
        raise ArgumentError(f"--choices {args.choices} must be >= 2")
    if os.path.isdir(args.output):
        raise ArgumentError(f"--output {args.output} is a folder: name the task file to write")
    output_folder(args.output, "--output")  # missing, or a file in its place: one line
    documents = _documents(args.input, args.json_key)
    items = build_items(documents, args.items_per_document, args.choices, args.seed)
    if not items:
        raise DataError(
            f"--input {args.input}: no document has a passage of 100-300 characters followed by a "
            f"sentence of 30-120 characters; use a corpus of running prose"
        )
    atomic_file.write_text(args.output, "".join(json.dumps(item) + "\n" for item in items))
    print(
        f"wrote {len(items)} items ({args.choices} choices each) from {len(documents)} documents of "
        f"{args.input} to {args.output}"
    )


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_patch.runtime.command import configure_logging, run_main

    configure_logging("build_zero_shot_task")
    return run_main(lambda: _run(build_parser().parse_args(argv)), io_errors_are_user_errors=True)


if __name__ == "__main__":
    sys.exit(main())
