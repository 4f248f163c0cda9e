"""The engines of the checkpoint tools (``tools/convert_checkpoint.py``, ``tools/evaluate.py``,
``tools/export_hf.py``).

Modules (import them directly):

* :mod:`~megatron_patch.checkpoint_tools.common` -- ``ToolError`` / ``VerificationError``, logging,
  and the torch.distributed world of a tool run (``tool_session``).
* :mod:`~megatron_patch.checkpoint_tools.source` -- a checkpoint as the tools see it
  (``CheckpointInfo``): its model shape from the metadata, layout checks, building and loading a
  model at any TP/PP.
* :mod:`~megatron_patch.checkpoint_tools.logits` -- full-vocabulary logits of a model chunk at any
  layout, through megatron's pipeline schedules.
* :mod:`~megatron_patch.checkpoint_tools.output` -- folder outputs written under a temporary name
  and renamed when complete.
* :mod:`~megatron_patch.checkpoint_tools.conversion` -- patch-stage checkpoint -> token-stage start.
* :mod:`~megatron_patch.checkpoint_tools.token_stream` -- evaluation text: documents, EOD, windows.
* :mod:`~megatron_patch.checkpoint_tools.evaluation` -- token-level loss, perplexity, bits per byte.
* :mod:`~megatron_patch.checkpoint_tools.hf_export` -- Megatron tensors -> Hugging Face Llama.
"""
