"""Patch aggregation: the mean of every K consecutive token embeddings (paper Eq. 1)."""

import torch


def check_patch_size(patch_size: int) -> None:
    """ValueError unless ``patch_size`` is an integer K >= 1 (the one check of K's type)."""
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size={patch_size!r} is invalid: use an integer K >= 1")


def aggregate_patches(embeddings: torch.Tensor, patch_size: int, sequence_parallel: bool = False) -> torch.Tensor:
    """Average each run of ``patch_size`` consecutive token embeddings into one patch embedding.

    Args:
        embeddings: ``[s*K, b, h]`` token embeddings, sequence first (Megatron layout). Under
            sequence parallelism this is the rank's local chunk, which must hold whole patches.
        patch_size: K, tokens per patch (>= 1). K=1 returns ``embeddings`` itself.
        sequence_parallel: only changes the error message (the chunk is a rank's share).

    Returns:
        ``[s, b, h]`` patch embeddings in the dtype of ``embeddings``: plain mean, no scaling,
        no parameters.
    """
    check_patch_size(patch_size)
    if patch_size == 1:
        return embeddings
    tokens, batch, hidden = embeddings.shape
    if tokens % patch_size != 0:
        if sequence_parallel:
            raise ValueError(
                f"sequence-parallel chunk of {tokens} tokens does not hold whole patches of "
                f"K={patch_size}: make --seq-length (patches) divisible by the tensor-parallel size"
            )
        raise ValueError(
            f"sequence of {tokens} tokens is not a multiple of patch_size K={patch_size}: use samples of K*T tokens"
        )
    # [s*K, b, h] -> [s, K, b, h] -> [s, b, h]
    return embeddings.view(tokens // patch_size, patch_size, batch, hidden).mean(dim=1)
