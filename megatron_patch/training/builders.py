"""Model, optimizer and LR schedule of one trainer rank, built from megatron.core's own pieces."""

import logging
from typing import List

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_patch.architecture.build import build_model_chunks
from megatron_patch.training.config import OptimizerSettings, TrainerConfig

logger = logging.getLogger(__name__)


def build_model(config: TrainerConfig) -> List[torch.nn.Module]:
    """This rank's model chunks, wrapped as megatron trains them: [DDP(Float16Module?(PatchGPTModel))],
    one per virtual pipeline stage (``--virtual-pipeline-model-parallel-size``), else one.

    As Megatron-LM wraps them: each chunk has its own DDP and gradient buffer, chunks after the
    first without bucketing (their reductions overlap the other chunks' backward anyway), and with
    ``--overlap-grad-reduce`` the schedule holds every chunk's reduction back until that chunk's
    last backward (``no_sync_func``) and then starts it (``grad_sync_func``, per chunk with V > 1).
    """
    transformer_config = config.model.transformer_config(config.cpu)
    transformer_config.finalize_model_grads_func = finalize_model_grads  # called with the list of chunks
    chunks = build_model_chunks(config.model, transformer_config, config.cpu)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=config.overlap_grad_reduce,
        overlap_param_gather=config.overlap_param_gather,
        use_distributed_optimizer=config.optimizer.distributed,
    )
    model = [
        DistributedDataParallel(transformer_config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    if config.overlap_grad_reduce:
        # megatron's schedules run every micro-batch but a chunk's last inside no_sync, so the bucket
        # reductions start only once a bucket's gradients are complete (in the last backward)
        if len(model) == 1:
            transformer_config.no_sync_func = model[0].no_sync
        else:
            transformer_config.no_sync_func = [chunk.no_sync for chunk in model]
            transformer_config.grad_sync_func = [chunk.start_grad_sync for chunk in model]
    for chunk in model:
        chunk.broadcast_params()
    return model


def gather_updated_parameters(model: List[torch.nn.Module]) -> None:
    """Finish the weight all-gather that ``--overlap-param-gather`` defers to the next training
    forward, so every rank holds the updated weights before they are read outside one (validation,
    checkpoints). A no-op without the flag."""
    for chunk in model:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def build_optimizer(settings: OptimizerSettings, model: List[torch.nn.Module]):
    """megatron's Adam(W) (FusedAdam when TE/Apex are installed, else torch's AdamW, foreach or fused
    per ``--torch-adam-impl``), with grad clipping."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=settings.bf16,
        params_dtype=torch.bfloat16 if settings.bf16 else torch.float32,
        use_distributed_optimizer=settings.distributed,
    )
    optimizer = get_megatron_optimizer(config, model)
    if settings.torch_adam_impl == "fused":
        use_fused_torch_adam(optimizer)
    return optimizer


def _runs_torch_adam(sub) -> bool:
    """Whether megatron optimizer ``sub`` steps torch's Adam(W): megatron's fallback without TE or
    Apex (their FusedAdam is not a ``torch.optim.Adam``)."""
    return isinstance(sub.optimizer, torch.optim.Adam)


def _torch_adams(optimizer) -> list:
    """The torch Adam(W)s inside ``optimizer``."""
    return [sub.optimizer for sub in sub_optimizers(optimizer) if _runs_torch_adam(sub)]


def use_fused_torch_adam(optimizer) -> int:
    """Run megatron's fallback torch AdamW with torch's fused kernel instead of its foreach one.

    megatron constructs ``torch.optim.AdamW`` without choosing a kernel, so torch takes the foreach
    implementation: about ten passes over the fp32 weights and moments per step. ``fused`` is a
    documented option of every parameter group (set here before the first step; torch creates
    Adam's state to match it, step counters on the parameters' device) and does the same update in
    one pass. Returns how many optimizers were switched (0 when TE or Apex provide FusedAdam).
    """
    adams = _torch_adams(optimizer)
    for adam in adams:
        if adam.state:
            raise RuntimeError("use_fused_torch_adam must run before the optimizer's first step")
        adam.defaults.update(fused=True, foreach=False)
        for group in adam.param_groups:
            group.update(fused=True, foreach=False)
    return len(adams)


def build_scheduler(settings: OptimizerSettings, optimizer, stage_iters: int) -> OptimizerParamScheduler:
    """A fresh warmup + decay over ``stage_iters`` steps (each stage gets its own, as in the paper)."""
    warmup = min(settings.warmup_iters, stage_iters)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(stage_iters, warmup + 1),
        lr_decay_style=settings.decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=max(stage_iters, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def sub_optimizers(optimizer) -> list:
    """The megatron optimizers inside a ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def reset_optimizer_state(optimizer) -> None:
    """Forget Adam's moments and step counts; keep the (fp32 main) weights.

    Used at the stage switch: the paper restarts the optimizer from the patch-stage weights, and
    keeping megatron's fp32 main weights avoids rounding them through the bf16 model copy. torch's
    Adam counts steps in each parameter's state; Transformer Engine's and Apex's FusedAdam (used by
    megatron when installed) count them in the parameter group (``group["step"]``), as does a
    distributed optimizer's loaded state: both go, so the first token-stage update is bias-corrected
    as step 1.
    """
    for sub in sub_optimizers(optimizer):
        sub.optimizer.state.clear()
        for group in sub.optimizer.param_groups:
            group.pop("step", None)


def _torch_adam_under_distributed_optimizer(optimizer) -> list:
    """The DistributedOptimizers of ``optimizer`` that run torch's Adam(W) (no TE or Apex)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [sub for sub in sub_optimizers(optimizer) if isinstance(sub, DistributedOptimizer) and _runs_torch_adam(sub)]


def prepare_optimizer_state_for_loading(optimizer) -> None:
    """Give a fresh distributed optimizer over torch's Adam a state to be loaded into.

    megatron-core 0.16.1 builds the load template of a DistributedOptimizer from ``state_dict()``,
    which, with torch's Adam (no TE or Apex), asserts that every parameter's state holds the same
    ``step``: it fails on an optimizer that has not stepped, i.e. on every resume. megatron's own
    remedy (used for its FSDP path) is a step with zero gradients on the inner optimizer: it
    touches only the fp32 main-weight shards and Adam's moments, which the load then overwrites.
    """
    for sub in _torch_adam_under_distributed_optimizer(optimizer):
        if len(sub.optimizer.state) == 0:
            sub._init_optimizer_states_with_dummy_values()


def restore_adam_step_counters(optimizer) -> None:
    """After a distributed-optimizer load, set every parameter's Adam ``step`` to the loaded one.

    megatron-core 0.16.1's ``DistributedOptimizer`` (torch's Adam, no TE or Apex) saves the step
    count once, in its parameter groups, and on load (a) gives every parameter's state one shared
    ``step`` tensor, which torch's Adam then advances once per parameter per step, and (b) copies
    the load template's per-parameter ``step`` (the pre-load value) over it again with the moments.
    Both leave the bias corrections of the resumed run wrong; each parameter gets its own counter
    holding its group's loaded step.
    """
    for sub in _torch_adam_under_distributed_optimizer(optimizer):
        for group in sub.optimizer.param_groups:
            if "step" not in group:
                continue
            # where torch's Adam keeps the counter: on the parameter's device for the fused and
            # capturable kernels, on the host otherwise
            on_device = group.get("fused") or group.get("capturable")
            for param in group["params"]:
                if param in sub.optimizer.state:
                    sub.optimizer.state[param]["step"] = torch.tensor(
                        float(group["step"]), dtype=torch.float32, device=param.device if on_device else "cpu"
                    )
