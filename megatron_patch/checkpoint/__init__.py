"""Checkpoints: megatron ``torch_dist`` checkpoints written atomically, and read back by the tools.

* :mod:`~megatron_patch.checkpoint.store` -- save and load (sharded state, metadata, manifest check).
* :mod:`~megatron_patch.checkpoint.folders` -- a ``--save`` folder: its ``iter_N`` checkpoints and tracker.
* :mod:`~megatron_patch.checkpoint.info` -- a checkpoint as the tools see it (model shape, layout).
"""
