"""Conversions of a trained checkpoint.

* :mod:`~megatron_patch.conversion.reshard` -- a patch-stage checkpoint (any TP/PP) into a
  token-stage start (any TP/PP), checked by its logits.
* :mod:`~megatron_patch.conversion.hf_export` -- megatron tensors into a Hugging Face Llama folder.
* :mod:`~megatron_patch.conversion.hf_folder` -- what such a folder holds (no heavy imports).
"""
