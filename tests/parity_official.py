"""The official PatchTrain recipe as an independent float64 reference, and the project's side of the
parity tests (tests/unit/test_parity_official.py, tests/dist/test_parity_official_tp2.py).

The reference is written from the paper (arXiv 2407.12665, Eq. 1-2) and the semantics of the
official code (shaochenze/PatchTrain, ``modeling_llama.py``) on transformers' ``LlamaForCausalLM``
holding the weights ``tools/export_hf.py`` exported: a sample of K*T token ids is its own label
sequence; the K embeddings of each patch are averaged (after a cast to bf16 in bf16 training); the
patches get RoPE positions 0..T-1; the output at patch i (i < T-1) is one log-softmax, scored by
the mean of K NLLs against the K tokens of patch i+1 (``labels[:, K:]`` reshaped to ``[-1, K]``).

``MISTAKES`` plants one error each into the reference; a parity test must see every one of them.
"""

import dataclasses
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

MISTAKES = ("targets-one-token-late", "patch-scored-against-its-own-tokens", "positions-i-times-K")
T = 32  # patches per sample (the trained checkpoint's --seq-length)
TRAIN_ITERS = 12  # K=4, lambda=2/3: 8 patch steps, then 4 token steps
LOSS_TOLERANCE = 1e-5  # nats: fp32 (project) against float64 (reference)
GRAD_TOLERANCE = 1e-5  # ||difference|| / ||reference gradient||, per tensor ...
FLOOR_FACTOR = 10  # ... or 10x transformers' own fp32 error on that tensor, if larger
BF16_TOLERANCE = 2e-3  # nats: bf16 weights and activations (project) against float64 with the bf16 cast
# (measured: at most 3.2e-4 at K = 2, 4, 8 on the tiny checkpoint; bf16 rounds at 3.9e-3 relative)


def official_patch_loss(
    hf_model, x: torch.Tensor, patch_size: int, *, bf16_cast: bool = False, mistake: Optional[str] = None
) -> torch.Tensor:
    """The official patch loss of ``x`` ``[b, K*T + 1]`` token ids (float64 scalar, nats/target).

    The sample is ``x[:, :K*T]``; the extra last token is read only by the "one token late"
    mistake. ``bf16_cast``: the official training cast of the token embeddings to bf16 before the
    mean (the rest runs in the model's dtype). At K=1 this is next-token cross-entropy.
    """
    K = patch_size
    ids = x[:, :-1]  # [b, K*T]
    b, length = ids.shape
    T = length // K
    embeds = hf_model.model.embed_tokens(ids)  # [b, K*T, h]
    if bf16_cast:
        embeds = embeds.to(torch.bfloat16)
    embeds = embeds.view(b, T, K, -1).mean(2).to(hf_model.dtype)  # [b, K*T, h] -> [b, T, K, h] -> [b, T, h]
    step = K if mistake == "positions-i-times-K" else 1
    positions = (torch.arange(T) * step).unsqueeze(0).expand(b, T)  # [b, T]
    logits = hf_model(inputs_embeds=embeds, position_ids=positions).logits.to(torch.float64)  # [b, T, V]
    log_probs = F.log_softmax(logits[:, :-1].reshape(-1, logits.shape[-1]), dim=1)  # [b*(T-1), V]
    if mistake == "targets-one-token-late":
        labels = x[:, K + 1 :]  # [b, (T-1)*K]: x_{(i+1)K+k+1}
    elif mistake == "patch-scored-against-its-own-tokens":
        labels = ids[:, :-K]  # [b, (T-1)*K]: x_{iK+k}
    else:
        labels = ids[:, K:]  # [b, (T-1)*K]: x_{(i+1)K+k}, the next patch
    labels = labels.reshape(-1, K)  # [b*(T-1), K]
    return sum(F.nll_loss(log_probs, labels[:, k]) for k in range(K)) / K


def load_hf(folder: str, dtype=torch.float64):
    """The exported folder as transformers' ``LlamaForCausalLM`` in ``dtype`` (eager attention)."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        folder, torch_dtype=torch.float32, attn_implementation="eager"
    )
    return model.to(dtype).eval()


def hf_gradients(hf_model) -> Dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in hf_model.named_parameters()}


def reference_loss_and_gradients(hf_model, x: torch.Tensor, patch_size: int, mistake: Optional[str] = None):
    """(official patch loss, ``{transformers name: gradient}``) of ``x``, from zeroed gradients."""
    hf_model.zero_grad()
    loss = official_patch_loss(hf_model, x, patch_size, mistake=mistake)
    loss.backward()
    return loss.detach(), hf_gradients(hf_model)


# --------------------------------------------------------------------------- the project's side
def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The PatchGPTModel inside a chunk (bf16 chunks are megatron ``Float16Module``s)."""
    return chunk.module if hasattr(chunk, "module") else chunk


def project_patch_loss(chunk: torch.nn.Module, x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The project's patch loss (fp32 scalar) of the sample ``x[:, :K*T]``, as the trainer builds
    it: Megatron's ``tokens = x[:-1]``, ``labels = x[1:]``, next-patch targets from
    ``loss.patch_targets``, the model's per-target losses and their masked mean.

    The only place the parity tests call into the model's interface (the patch size is a forward
    argument; older trees set it with ``set_patch_size`` and let the model build the targets).
    """
    from megatron_patch.loss import patch_targets
    from tests.loss_helpers import masked_mean

    tokens, labels = x[:, :-1], x[:, 1:]  # [b, K*T] each
    model = unwrap(chunk)
    if hasattr(model, "set_patch_size"):
        model.set_patch_size(patch_size)
        losses = chunk(tokens, None, None, labels=labels)  # [b, T, K]
        mask = patch_targets(labels, None, patch_size)[1].transpose(0, 1)  # [T, b, K] -> [b, T, K]
    else:
        targets, mask = patch_targets(labels, None, patch_size)  # [b, T, K] each
        losses = chunk(tokens, None, None, labels=targets, patch_size=patch_size)  # [b, T, K]
    return masked_mean(losses, mask.reshape(losses.shape))  # K=1 may give [b, T]: [b, T, 1] -> [b, T]


def project_gradients_as_llama(chunk: torch.nn.Module, info, folder: str) -> Dict[str, torch.Tensor]:
    """Every parameter's gradient, unsharded from any TP layout and renamed to transformers'
    Llama names by the exporter's own mapping (fused qkv split per group, ``[gate; up]`` split).

    The gradients are written as a checkpoint in the model's sharded layout (``folder``, the same
    path on every rank, empty) and read back whole, so TP=2 shards join as the weights do.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_patch.conversion import hf_export

    model = unwrap(chunk)
    grads = {id(param): param.grad for param in model.parameters()}

    def swap(tree):
        if isinstance(tree, dict):
            return {key: swap(value) for key, value in tree.items()}
        if isinstance(tree, (ShardedTensor, ShardedTensorFactory)) and id(tree.data) in grads:
            return dataclasses.replace(tree, data=grads[id(tree.data)].detach().clone())
        return tree

    sharded = {
        key: value for key, value in swap(model.sharded_state_dict()).items() if not key.endswith("_extra_state")
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(sharded, folder)
    plain = {
        key: value
        for key, value in dist_checkpointing.load_plain_tensors(folder).items()
        if isinstance(value, torch.Tensor)
    }
    return hf_export.to_llama(info, plain, info.padded_vocab_size)


def corpus_sample(prefix: str, batch: int, length: int) -> torch.Tensor:
    """``[batch, length]`` token ids: consecutive stretches of the corpus' ``.bin`` (real text, so a
    planted mistake changes what the model is asked to predict, not just noise)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    stream = torch.cat([torch.from_numpy(dataset[i].astype("int64")) for i in range(min(len(dataset), 8))])
    assert stream.numel() >= batch * length, f"{prefix}: {stream.numel()} tokens < {batch * length}"
    return stream[: batch * length].view(batch, length)  # [b*s] -> [b, s]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference|| (Frobenius norms, float64)."""
    reference = reference.to(torch.float64)
    return (
        torch.linalg.vector_norm(ours.to(torch.float64) - reference)
        / torch.linalg.vector_norm(reference).clamp(min=1e-30)
    ).item()


# --------------------------------------------------------------------------- the comparison
def trained_and_exported(tiny_corpus: dict, folder: str, *layout) -> dict:
    """Train a tiny two-stage run through the trainer (``TRAIN_ITERS`` steps, K=4, ``layout`` flags)
    in ``folder`` (the same path on every rank), export its final checkpoint with
    tools/export_hf.py, and load both sides: ``{info, tensor_parallel, hf, hf_fp32, prefix}``, with
    transformers' Llama in float64 (the reference) and in float32 (the rounding floor)."""
    from megatron_patch.checkpoint import folders
    from megatron_patch.checkpoint import info as checkpoint_info
    from megatron_patch.training import cli
    from tests.training.common import trainer_args
    from tools import export_hf

    root = os.path.join(folder, "run")
    assert cli.main(trainer_args(tiny_corpus, root, "--eval-iters", "0", *layout, train_iters=TRAIN_ITERS)) == 0
    checkpoint = folders.checkpoint_dir(root, TRAIN_ITERS)
    hf_folder = os.path.join(folder, "hf")
    assert export_hf.main(["--cpu", "--load", checkpoint, "--save", hf_folder]) == 0
    return {
        "info": checkpoint_info.read_checkpoint(checkpoint),
        "hf": load_hf(hf_folder),
        "hf_fp32": load_hf(hf_folder, torch.float32),
        "prefix": tiny_corpus["prefix"],
    }


def project_model(parity: dict, tensor_parallel: int = 1, bf16: bool = False) -> torch.nn.Module:
    """This rank's chunk of the checkpoint's model at TP=``tensor_parallel`` (PP=1), as the tools
    build it (bf16: a megatron ``Float16Module`` around bf16 weights, as the trainer runs --bf16)."""
    from megatron_patch.checkpoint import info as checkpoint_info

    model = checkpoint_info.build_model(parity["info"], tensor_parallel, 1, bf16=bf16)
    checkpoint_info.load_weights(model, parity["info"])
    return model[0]


def parity_mismatches(
    parity: dict,
    x: torch.Tensor,
    patch_size: int,
    grads_folder: str,
    tensor_parallel: int = 1,
    mistake: Optional[str] = None,
) -> list:
    """What differs between the project's patch loss and gradients and the official recipe's (with
    ``mistake`` planted in the recipe): a list of lines, empty when they agree.

    Loss: within LOSS_TOLERANCE. Gradients of every parameter (embedding, each layer's weights,
    output layer): within GRAD_TOLERANCE, or FLOOR_FACTOR x transformers' own fp32 error on that
    tensor if larger (the attention q/k gradients of a barely trained model are ~1e-4 of the others
    and as noisy in fp32 as transformers' own fp32 run). ``grads_folder``: empty, the same on every rank.
    """
    chunk = project_model(parity, tensor_parallel)
    ours = project_patch_loss(chunk, x, patch_size)
    ours.backward()
    ours_grads = project_gradients_as_llama(chunk, parity["info"], grads_folder)
    _, float64_grads = reference_loss_and_gradients(parity["hf"], x, patch_size)
    _, float32_grads = reference_loss_and_gradients(parity["hf_fp32"], x, patch_size)
    floors = {name: relative_error(float32_grads[name], grad) for name, grad in float64_grads.items()}
    reference, reference_grads = reference_loss_and_gradients(parity["hf"], x, patch_size, mistake)
    assert set(ours_grads) == set(reference_grads)
    mismatches = []
    if not abs(ours.item() - reference.item()) <= LOSS_TOLERANCE:
        mismatches.append(f"loss {ours.item():.7f} vs {reference.item():.7f}")
    for name, expected in reference_grads.items():
        error = relative_error(ours_grads[name], expected)
        tolerance = max(GRAD_TOLERANCE, FLOOR_FACTOR * floors[name])
        if not error <= tolerance:
            mismatches.append(f"{name}: relative gradient error {error:.2e} > {tolerance:.2e}")
    return mismatches
