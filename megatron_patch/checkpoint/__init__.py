"""Checkpoints: megatron ``torch_dist`` checkpoints written atomically, and read back by the tools.

* :mod:`~megatron_patch.checkpoint.store` -- save, load, tracker and metadata of a ``--save`` folder.
* :mod:`~megatron_patch.checkpoint.info` -- a checkpoint as the tools see it (model shape, layout).
"""
