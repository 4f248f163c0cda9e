"""Evaluation of a checkpoint at token level.

* :mod:`~megatron_patch.evaluation.token_stream` -- evaluation text as one token stream, and windows.
* :mod:`~megatron_patch.evaluation.perplexity` -- loss, perplexity and bits per byte at any TP/PP.
* :mod:`~megatron_patch.evaluation.logits` -- full-vocabulary logits of a model at any layout.
* :mod:`~megatron_patch.evaluation.report_file` -- the ``--output-json`` a tool may write.
"""
