"""The items of ``tiny_next_sentence`` (the JSONL beside this file) as the harness's data set."""

import json
import os

ITEMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_next_sentence.jsonl")


def load(**_):
    """``{"test": Dataset}`` of ``{id, document, context, choices, label}`` rows (harness
    ``custom_dataset``; the harness passes the task's metadata as keywords, unused here)."""
    import datasets

    with open(ITEMS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
