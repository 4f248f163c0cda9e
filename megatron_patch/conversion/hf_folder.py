"""What an exported Hugging Face folder holds (tools/export_hf.py writes it): its file names and
the provenance file that marks it as an export. No torch or megatron import, so that the zero-shot
tool can recognise an export cheaply."""

import os

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
