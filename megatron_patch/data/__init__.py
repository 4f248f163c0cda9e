"""Data for patch-level training: tokenizer, corpus preprocessing, stage-split datasets.

Modules (import them directly; this package root imports nothing, so that the tools start fast):

* :mod:`~megatron_patch.data.tokenizer` -- ``SentencePieceTokenizer``, a megatron.core tokenizer.
* :mod:`~megatron_patch.data.datasets` -- ``StageDataConfig``, ``build_stage_datasets``: the
  patch-stage / token-stage / validation datasets over megatron's ``GPTDataset``.
* :mod:`~megatron_patch.data.stage_dataset` -- one stage's ``GPTDataset``, its cache key and folder.
* :mod:`~megatron_patch.data.split` -- the per-prefix document ranges of each stage (λ rule).
* :mod:`~megatron_patch.data.preprocess` -- the engine of ``tools/preprocess_data.py``.
* :mod:`~megatron_patch.data.inputs` -- reading JSONL / text inputs (globs, lines, documents).
* :mod:`~megatron_patch.data.compression` -- gz/xz/zst inputs: first bytes checked, decompressed.
* :mod:`~megatron_patch.data.indexed` -- ``.bin``/``.idx`` naming, checks and merging.
* :mod:`~megatron_patch.data.staging` -- atomic outputs (temporary names, rename when complete).
"""
