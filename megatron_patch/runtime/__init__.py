"""Runtime: how a process of the project runs, apart from what it computes.

* :mod:`~megatron_patch.runtime.parallel` -- torch.distributed and megatron's model-parallel groups.
* :mod:`~megatron_patch.runtime.cpu_mode` -- the explicit opt-in that runs megatron.core on CPU.
* :mod:`~megatron_patch.runtime.command` -- flags, logging, one-line errors and exit codes of every command.
* :mod:`~megatron_patch.runtime.child_processes` -- forked helpers that end with their parent.
* :mod:`~megatron_patch.runtime.atomic_file` -- small files (records, reports) replaced whole.
* :mod:`~megatron_patch.runtime.staged_folder` -- folder outputs renamed into place when complete.
* :mod:`~megatron_patch.runtime.owned_temp` -- temporary folders whose abandoned copies a later run removes.
"""
