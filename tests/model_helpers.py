"""Helpers for model-level tests: build tiny models in any layout, run the trainer's schedule, and
compare weights or gradients across layouts by resharding them through dist_checkpointing."""

import dataclasses
import os

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from megatron_patch.architecture.build import unwrap
from megatron_patch.architecture.presets import get_preset, transformer_config
from megatron_patch.loss import patch_targets
from megatron_patch.model import build_patch_gpt_model
from megatron_patch.runtime import parallel
from megatron_patch.training.plan import StagePlan
from megatron_patch.training.step import run_schedule

VOCAB = 128
SEQ = 16  # T, decoder positions


def build(tp=1, pp=1, sequence_parallel=False, seed=1234, ddp=True, fused_rope=False):
    """A tiny PatchGPTModel for this rank in the TP/PP layout given (re-initialises megatron's groups)."""
    parallel.init_model_parallel(tp, pp, seed=seed)
    config = transformer_config(
        get_preset("tiny"),
        tensor_parallel=tp,
        pipeline_parallel=pp,
        sequence_parallel=sequence_parallel,
        cpu=True,
        calculate_per_token_loss=True,
    )
    model = build_patch_gpt_model(
        config,
        VOCAB,
        SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        fused_rope=fused_rope,
    )
    if not ddp:
        return model
    config.finalize_model_grads_func = finalize_model_grads
    wrapped = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    return [wrapped]


def trainer_config(*flags, tokenizer_model):
    """The trainer's configuration for the tiny preset on CPU, plus ``flags`` (model-building only:
    the data path is never read)."""
    from megatron_patch.training.arguments import parse_args

    return parse_args(
        [
            "--model",
            "tiny",
            "--cpu",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "8",
            "--train-iters",
            "4",
            "--lr",
            "1e-3",
            "--data-path",
            "unused",
            "--tokenizer-model",
            tokenizer_model,
            "--recompute-granularity",
            "none",
            "--make-vocab-size-divisible-by",
            str(VOCAB),
            *flags,
        ],
        world_size=1,
    )


def forward_losses(model, batch, patch_size):
    """The model's per-target losses of one micro-batch and their mask, of one shape: ``[b, T, K]``
    next-patch targets at K > 1 (built as the trainer's step builds them), ``[b, s]`` token labels at
    K=1 (GPTModel's own call)."""
    if patch_size == 1:
        return model(batch["tokens"], None, None, labels=batch["labels"]), batch["loss_mask"]
    targets, mask = patch_targets(batch["labels"], batch["loss_mask"], patch_size)  # [b, T, K] each
    return model(batch["tokens"], None, None, labels=targets, patch_size=patch_size), mask


def batches(patch_size, micro_batch_size=2, count=2, seed=7):
    """``count`` micro-batches of ``[b, K*T]`` tokens/labels/loss_mask, the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        text = torch.randint(0, VOCAB, (micro_batch_size, patch_size * SEQ + 1), generator=generator)
        loss_mask = (torch.rand(micro_batch_size, patch_size * SEQ, generator=generator) > 0.1).float()
        out.append({"tokens": text[:, :-1], "labels": text[:, 1:], "loss_mask": loss_mask})
    return out


def train_forward_backward(model, micro_batches, patch_size):
    """The trainer's schedule on these micro-batches (one data-parallel rank's share of a step at
    K=``patch_size``); returns the mean loss (every rank)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    b = micro_batches[0]["tokens"].shape[0]
    stage = StagePlan(
        "patch" if patch_size > 1 else "token", patch_size, 1, 0, b * len(micro_batches), SEQ, b, len(micro_batches)
    )
    totals = run_schedule(model, iter(micro_batches), stage, forward_only=False)
    return (totals[0] / totals[1]).item()


def save_weights(model, path):
    dist_checkpointing.save(unwrap(model[0]).sharded_state_dict(), _fresh(path))


def load_weights(model, path):
    inner = unwrap(model[0])
    inner.load_state_dict(dist_checkpointing.load(inner.sharded_state_dict(), path), strict=True)


def save_gradients(model, path):
    """Save every parameter's gradient (DDP main_grad) under its parameter's sharded key, so
    gradients of any layout can be compared in one global layout."""
    grads = {id(p.data): p.main_grad for p in model[0].parameters()}
    grads.update({id(p): p.main_grad for p in model[0].parameters()})

    def swap(tree):
        if isinstance(tree, dict):
            return {k: swap(v) for k, v in tree.items()}
        if isinstance(tree, (ShardedTensor, ShardedTensorFactory)) and id(tree.data) in grads:
            return dataclasses.replace(tree, data=grads[id(tree.data)].to(tree.data.dtype))
        return tree

    dist_checkpointing.save(swap(unwrap(model[0]).sharded_state_dict()), _fresh(path))


def plain(path):
    """Every tensor of a checkpoint, unsharded (rank-local load of the whole thing)."""
    return {k: v for k, v in dist_checkpointing.load_plain_tensors(path).items() if isinstance(v, torch.Tensor)}


def _fresh(path):
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                os.remove(full)
    dist.barrier()
    return path


def shared_tmp(tmp_path_factory, name):
    """A directory path that is the same on every rank (rank 0's tmp dir, broadcast)."""
    holder = [str(tmp_path_factory.mktemp(name)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def compile_fused_kernels(monkeypatch):
    """Compile the opt-in fusions' element-wise kernels for the rest of a test, as megatron's
    ``jit_fuser`` (``torch.compile``) does outside the tests. The test processes import everything
    with ``TORCHDYNAMO_DISABLE=1`` (tests/conftest.py), which leaves every ``jit_fuser`` function
    eager for good; each is replaced here by ``torch.compile`` of itself, with dynamo back on:
    megatron's SwiGLU forward/backward, the fused RoPE and the fused cross-entropy's three passes.
    """
    from megatron.core.fusions import fused_bias_swiglu

    from megatron_patch.architecture import attention, fused_cross_entropy

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # so a test can count what compiles from here on
    for module, name in (
        (fused_bias_swiglu, "swiglu"),
        (fused_bias_swiglu, "swiglu_back"),
        (attention, "apply_rotary"),
        (fused_cross_entropy, "_row_max"),
        (fused_cross_entropy, "_row_sum_exp"),
        (fused_cross_entropy, "_scaled_exp"),
    ):
        monkeypatch.setattr(module, name, torch.compile(getattr(module, name)))


def runs_through_trainer_builders(model_parallel, flags, seed, tokenizer_model):
    """Build the tiny model as the trainer does (``build_model`` of the trainer's configuration with
    ``flags``) and run one micro-batch at K=4 and at K=1, each from zeroed gradients.

    Returns ``(model, runs)``: the unwrapped model and ``runs[K] = (losses, loss, gradients)`` with
    the model's losses (``[b, T, K]``, or ``[b, s]`` at K=1), the masked patch loss that was
    back-propagated, and ``{name: gradient}`` (megatron's DDP accumulates into ``main_grad``).
    """
    from megatron_patch.training.builders import build_model
    from tests.loss_helpers import masked_mean

    model_parallel(1, 1, seed=seed)
    chunk = build_model(trainer_config(*flags, tokenizer_model=tokenizer_model))[0]
    model = unwrap(chunk)
    runs = {}
    for patch_size in (4, 1):
        chunk.zero_grad_buffer()
        losses, mask = forward_losses(model, batches(patch_size)[0], patch_size)
        loss = masked_mean(losses, mask)
        loss.backward()
        runs[patch_size] = (
            losses.detach(),
            loss.detach(),
            {
                name: (param.main_grad if param.grad is None else param.grad).clone()
                for name, param in model.named_parameters()
            },
        )
    return model, runs
