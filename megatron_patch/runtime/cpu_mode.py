"""CPU mode: run megatron.core's GPT model, schedules, optimizer and dist_checkpointing on CPU.

megatron-core 0.16.1 allocates on ``"cuda"`` in a handful of places even when every tensor
lives on the CPU (RNG state, grad-sync streams, ``Tensor.cuda()`` and ``device="cuda"`` arguments in
its optimizer, schedules and checkpointing). CPU mode is
an explicit, process-global opt-in for tests and the CPU quick start:

* a ``TorchFunctionMode`` rewrites ``device="cuda"`` / integer devices to the CPU, makes
  ``Tensor.cuda()`` a no-op and reports CPU tensors under their CUDA type names (the optimizer
  and grad clipping assert ``param.type() == "torch.cuda.FloatTensor"``);
* ``torch.cuda.current_device/synchronize/current_stream`` become CPU no-ops;
* megatron's RNG tracker is replaced by one that tracks the CPU generator
  (``seed_model_parallel_rng``), and activation recompute saves and restores the CPU state.

Nothing here runs on import. ``enable()`` refuses to run when CUDA is available, so CPU mode
can never silently take over a GPU job.
"""

import contextlib
import logging

import torch

from megatron_patch.errors import ArgumentError

logger = logging.getLogger(__name__)

_MODE = None


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Sends every CUDA allocation and transfer to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device is not None and (isinstance(device, int) or "cuda" in str(device)):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def _is_cuda_device(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, (str, torch.device)) and "cuda" in str(value))


class _NullStream:
    """Stands in for torch.cuda streams (grad-sync code waits on them)."""

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker API over the CPU default generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"rng seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    return CPURNGStatesTracker


def is_enabled() -> bool:
    """True once ``enable()`` has run in this process."""
    return _MODE is not None


def enable() -> None:
    """Turn CPU mode on for this process (idempotent). Raises if CUDA is available."""
    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise ArgumentError(
            "megatron_patch.runtime.cpu_mode.enable() refused: CUDA is available; run on the GPU "
            "(drop --cpu / cpu_mode.enable()) or hide the GPUs with CUDA_VISIBLE_DEVICES=''"
        )
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    logger.info("megatron_patch CPU mode enabled")


def seed_model_parallel_rng(seed: int) -> None:
    """CPU counterpart of ``tensor_parallel.model_parallel_cuda_manual_seed``.

    Call after ``parallel_state.initialize_model_parallel``; megatron's own seeding then fills
    a tracker that forks the CPU generator, so tensor-parallel ranks draw different dropout
    masks and data-parallel ranks the same ones, exactly as on GPU.
    """
    if not is_enabled():
        raise RuntimeError("seed_model_parallel_rng needs cpu_mode.enable() first")
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = _make_cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    mrandom.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
