"""Model, optimizer and LR schedule for one rank, built from megatron.core's own pieces."""

import argparse
import logging
from typing import List

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_patch.model import PatchGPTModel, build_patch_gpt_model
from megatron_patch.architecture.presets import get_preset, padded_vocab_size, transformer_config

logger = logging.getLogger(__name__)


def model_config(args: argparse.Namespace):
    """The TransformerConfig of this run (the preset plus parallel and precision flags)."""
    config = transformer_config(
        get_preset(args.model),
        tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        cpu=args.cpu,
        recompute=args.recompute_granularity,
        calculate_per_token_loss=True,  # the loss is the mean over every scored target of the global batch
        bias_activation_fusion=args.bias_swiglu_fusion,  # megatron's fused SwiGLU (no bias in this architecture)
    )
    config.finalize_model_grads_func = finalize_model_grads
    return config


def build_model(args: argparse.Namespace, vocab_size: int, patch_size: int) -> List[torch.nn.Module]:
    """This rank's model chunk, wrapped as megatron trains it: [DDP(Float16Module?(PatchGPTModel))]."""
    config = model_config(args)
    use_te = {"auto": None, "local": False, "transformer_engine": True}[args.transformer_impl]
    model = build_patch_gpt_model(
        config,
        padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size),
        args.seq_length,
        patch_size=patch_size,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_transformer_engine=use_te,
        fused_rope=args.rope_fusion,
        fused_cross_entropy=args.cross_entropy_fusion,
    )
    if not args.cpu:
        model.cuda(torch.cuda.current_device())
    if args.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    model = DistributedDataParallel(config, ddp_config, model)
    if args.overlap_grad_reduce:
        # megatron's schedules run every micro-batch but the last inside no_sync, so the bucket
        # reductions start only once a bucket's gradients are complete (in the last backward)
        config.no_sync_func = model.no_sync
    model.broadcast_params()
    return [model]


def gather_updated_parameters(model: List[torch.nn.Module]) -> None:
    """Finish the weight all-gather that ``--overlap-param-gather`` defers to the next training
    forward, so every rank holds the updated weights before they are read outside one (validation,
    checkpoints). A no-op without the flag."""
    for chunk in model:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def unwrap(model_chunk: torch.nn.Module) -> PatchGPTModel:
    """The model inside megatron's DDP / Float16Module wrappers."""
    while isinstance(model_chunk, (DistributedDataParallel, Float16Module)):
        model_chunk = model_chunk.module
    return model_chunk


def build_optimizer(args: argparse.Namespace, model: List[torch.nn.Module]):
    """megatron's Adam(W) (FusedAdam when TE/Apex are installed, else torch's AdamW, foreach or fused
    per ``--torch-adam-impl``), with grad clipping."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model)
    if args.torch_adam_impl == "fused":
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


def build_scheduler(args: argparse.Namespace, optimizer, stage_iters: int) -> OptimizerParamScheduler:
    """A fresh warmup + decay over ``stage_iters`` steps (each stage gets its own, as in the paper)."""
    warmup = min(args.lr_warmup_iters, stage_iters)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(stage_iters, warmup + 1),
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
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
    keeping megatron's fp32 main weights avoids rounding them through the bf16 model copy.
    """
    for sub in sub_optimizers(optimizer):
        sub.optimizer.state.clear()


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
                        float(group["step"]), dtype=torch.float32, device=param.device if on_device else "cpu")


def optimizer_state_size(optimizer) -> int:
    """Number of parameters with Adam state (0 right after ``reset_optimizer_state``)."""
    return sum(len(sub.optimizer.state) for sub in sub_optimizers(optimizer))
