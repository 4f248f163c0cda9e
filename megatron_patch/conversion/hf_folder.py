"""What an exported Hugging Face folder holds (tools/export_hf.py writes it): its file names and
the provenance file that marks it as an export. No torch or megatron import, so that the zero-shot
tool can recognise an export cheaply."""

import json
import os

from megatron_patch.errors import DataError

PROVENANCE = "megatron_patch_export.json"  # where the export came from; marks a folder as an export
EXPORT_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    PROVENANCE,
)


def is_export(folder: str) -> bool:
    """Whether ``folder`` holds an earlier export (what ``--force`` may replace)."""
    return os.path.isfile(os.path.join(folder, PROVENANCE))


def read_provenance(folder: str) -> dict:
    """The provenance record of the export in ``folder`` (``{}`` for a folder that is no export);
    DataError naming the file when it cannot be read or is not a JSON object (a hand-edited one)."""
    path = os.path.join(folder, PROVENANCE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable export record ({error}); export the checkpoint again") from None
    fields = ("progress", "conversion")  # read as objects by the report
    if not isinstance(record, dict) or any(not isinstance(record.get(key) or {}, dict) for key in fields):
        raise DataError(
            f"{path}: not an export record (a JSON object whose {' and '.join(fields)} are objects); "
            f"export the checkpoint again"
        )
    return record
