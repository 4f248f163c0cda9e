"""Stage-split GPT datasets for patch-level training, built on megatron.core's GPTDataset.

Patch-level training (Shao et al. 2024) trains first on a fraction λ of the data at patch level,
then on the remaining 1-λ at token level, **without repeating data**. This module gives each
stage its own documents:

* **Rule (per data prefix).** Megatron's ``split`` ("949,50,1") takes contiguous document ranges
  by count: training first, then validation, then test. The training documents are cut at the
  first document boundary where the cumulative token count reaches λ × (training tokens of the
  prefix): documents before the cut form the patch stage, documents after it the token stage
  (:mod:`megatron_patch.data.split`). No document is in two stages, and each stage's token share
  is λ resp. 1-λ up to one document (the patch stage overshoots by less than the longest
  training document). With K = 1 all training documents go to the token stage.
* **Samples.** Each stage is a megatron ``GPTDataset`` on its own ``indexed_indices``, shuffled
  with ``seed``. Items are megatron's dicts: ``tokens`` [L], ``labels`` [L] (tokens shifted by
  one), ``loss_mask`` [L], ``position_ids`` [L] (no ``attention_mask``), with L = K·T tokens
  for ``patch_train`` (T patches of K tokens) and L = T tokens for ``token_train`` and
  ``valid``. No position/attention reset at EOD and no EOD loss masking (paper fidelity).
  Asking a stage for more samples than one pass over its documents gives makes megatron repeat
  them (more epochs); a warning says so, since the paper sees each token once.
* **Epochs split** (``stage_split="epochs"``, the paper's multi-epoch recipe, its Table 2): both
  stages are ``GPTDataset`` objects on *all* training documents, sized by the budget (the patch stage
  the first λ of the tokens, the token stage the rest), so each stage makes as many passes as its
  tokens allow, fractional ones included. Megatron builds the passes itself: a stage of E epochs
  holds every training document E times; the document order and then the samples are shuffled
  over the whole passes together, except a last pass under 80% of one, which is shuffled on its
  own and only partly read, after the others. The token stage is shuffled with a seed
  of its own (:func:`stage_seed`), so it does not replay the patch stage's order.
* **Blends** (``["0.7", "p1", "0.3", "p2"]``): each prefix is split as above and each stage is a
  megatron ``BlendedDataset`` of the per-prefix stage datasets with the given weights, sized as
  ``BlendedMegatronDatasetBuilder`` sizes them. Without weights (``["p1", "p2"]``) the prefixes
  are weighted by their tokens in that stage.
* **Caching and ranks.** Megatron caches the sample indices (``.npy``) under ``cache_dir`` (or
  next to the data). The cache key includes the stage and its document range, so a new λ or
  split never reuses stale indices, the tokenizer's sha256, and the size and modification time
  of the prefix's ``.bin`` and ``.idx`` (:func:`prefix_files`), so a prefix rewritten in place
  (re-preprocessed, e.g. with ``--append-eod``: as many documents, other lengths) gets fresh
  indices instead of ones that point into the old tokens. With torch.distributed
  initialised, rank 0 builds (and caches) every dataset first, then a barrier, then the other
  ranks load them (``BlendedMegatronDatasetBuilder.build_generic_dataset``); without it, the
  datasets are built in this process. The largest token id of each ``.bin`` is checked against
  the tokenizer once per file, by rank 0, and recorded in the same cache folder
  (:mod:`megatron_patch.data.vocab_check`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split
from megatron.core.utils import log_single_rank
from torch.utils.data import Dataset

from megatron_patch.data.indexed import check_prefix
from megatron_patch.data.split import STAGE_SPLITS, PrefixSplit, parse_data_path, parse_split, split_prefix
from megatron_patch.data.stage_dataset import (
    StageGPTDataset,
    StageGPTDatasetConfig,
    check_cache_folder,
    index_cache_folder,
    prefix_files,
)
from megatron_patch.data.vocab_check import check_vocab
from megatron_patch.errors import DataError
from megatron_patch.runtime.rank_zero import on_rank_zero

logger = logging.getLogger(__name__)

STAGES = ("patch_train", "token_train", "valid")


@dataclass
class StageDataConfig:
    """Data of a two-stage run.

    ``sample_tokens`` gives each dataset's tokens per sample (``RunPlan.dataset_sample_tokens``:
    K·T for ``patch_train``, T for ``token_train`` and ``valid``). ``patch_data_fraction`` λ is
    the patch stage's share of the training tokens; 0 means no patch stage (token-only training).
    """

    data_path: list[str]
    split: str
    sample_tokens: dict[str, int]
    patch_data_fraction: float
    seed: int = 1234
    cache_dir: str | None = None
    stage_split: str = "documents"  # or "epochs": both stages on all training documents

    def __post_init__(self) -> None:
        self.prefixes, self.weights = parse_data_path(self.data_path)
        self.split_matrix = parse_split(self.split)
        for stage in STAGES:
            length = self.sample_tokens.get(stage)
            if not isinstance(length, int) or length < 1:
                raise DataError(f"sample_tokens[{stage!r}] = {length!r} must be a positive int (--seq-length)")
        if not 0.0 <= float(self.patch_data_fraction) < 1.0:
            raise DataError(
                f"patch_data_fraction {self.patch_data_fraction!r} must be in (0, 1) for a patch stage "
                f"(the paper uses 2/3), or 0 for token-only training"
            )
        if not isinstance(self.seed, int):
            raise DataError(f"seed {self.seed!r} must be an int")
        if self.stage_split not in STAGE_SPLITS:
            raise DataError(
                f"stage_split {self.stage_split!r} must be one of {', '.join(STAGE_SPLITS)} (--stage-split)"
            )

    @property
    def has_patch_stage(self) -> bool:
        return self.patch_data_fraction > 0


@dataclass
class StageDatasets:
    """The datasets of both stages; counts are documents/tokens of the stage ranges, summed over
    the prefixes of the blend (not the number of samples drawn)."""

    patch_train: Dataset | None
    token_train: Dataset | None
    valid: Dataset | None
    patch_documents: int
    token_documents: int
    patch_tokens: int
    token_tokens: int
    splits: list[PrefixSplit] = field(default_factory=list)
    stage_split: str = "documents"

    @property
    def train_tokens(self) -> int:
        """Tokens of all training documents (both stages' in the epochs split, their sum otherwise)."""
        return sum(s.train_tokens for s in self.splits)


def stage_seed(config: StageDataConfig, stage: str) -> int:
    """The shuffle seed of ``stage``'s samples: ``config.seed``, except for the token stage of the
    epochs split, which draws from the same documents as the patch stage and gets a seed derived
    from ``config.seed`` (numpy's SeedSequence), so its order is not the patch stage's again."""
    if config.stage_split == "epochs" and stage == "token_train":
        return int(numpy.random.SeedSequence([config.seed, 1]).generate_state(1)[0])
    return config.seed


def plan_stage_split(config: StageDataConfig, low_level: dict[str, IndexedDataset] | None = None) -> list[PrefixSplit]:
    """The document ranges of every prefix (see the module docstring); reads only the ``.idx``."""
    splits = []
    for prefix in config.prefixes:
        check_prefix(prefix)
        dataset = low_level[prefix] if low_level else IndexedDataset(prefix)
        splits.append(
            split_prefix(
                prefix,
                dataset.sequence_lengths,
                config.split_matrix,
                config.patch_data_fraction,
                config.stage_split,
            )
        )
    return splits


def _attribute(stage: str) -> str:
    return {"patch_train": "patch", "token_train": "token", "valid": "valid"}[stage]


def _gpt_config(config: StageDataConfig, tokenizer, stage: str, documents=(0, 0), files=None):
    """The megatron config of one dataset; ``files`` is its prefix's :func:`prefix_files` entry
    (left empty for the low-level dataset and the blend, whose keys do not use it: a blend's key
    holds its members' keys)."""
    return StageGPTDatasetConfig(
        random_seed=stage_seed(config, stage),
        sequence_length=config.sample_tokens[stage],
        blend=(config.prefixes, config.weights),
        split=config.split,
        path_to_cache=config.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        stage=stage,
        stage_documents=tuple(documents),
        stage_split=config.stage_split,
        prefix_files=dict(files or {}),
    )


def _check_tokens(stage: str, split: PrefixSplit, length: int, config: StageDataConfig) -> None:
    available = getattr(split, _attribute(stage)).tokens
    if available < length + 1:
        raise DataError(
            f"{stage} stage of '{split.prefix}' has {available} tokens but one sample needs "
            f"{length + 1} ({length} + 1 for the labels); add data, or lower --seq-length"
            + (
                f" or patch_data_fraction ({config.patch_data_fraction})"
                if config.has_patch_stage and stage != "valid"
                else ""
            )
        )


def _build(cls, *args):
    """Build on rank 0 first, barrier, then the other ranks (megatron's own pattern)."""
    return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, lambda: True, True, *args)


def _members(config: StageDataConfig, stage: str, splits: list[PrefixSplit]) -> list[tuple]:
    """``(split, weight or None)`` of the prefixes in a stage: all of them for training, those
    with validation documents for ``valid``. Checks each has enough tokens for one sample."""
    weights = config.weights or [None] * len(splits)
    members = [(s, w) for s, w in zip(splits, weights) if stage != "valid" or s.valid.documents > 0]
    for split, _ in members:
        _check_tokens(stage, split, config.sample_tokens[stage], config)
    return members


def _build_stage(config, tokenizer, stage, splits, low_level, files, num_samples) -> Dataset | None:
    """One stage: a StageGPTDataset per prefix, blended when there are several; ``files`` is
    :func:`prefix_files` of the prefixes."""
    length = config.sample_tokens[stage]
    index_split = Split.valid if stage == "valid" else Split.train
    members = _members(config, stage, splits)
    if not members:
        return None
    if len(members) == 1:
        sizes, targets, weights = [num_samples], [num_samples], None
    else:
        raw = [w if w is not None else getattr(s, _attribute(stage)).tokens for s, w in members]
        weights = [w / sum(raw) for w in raw]
        surplus = _gpt_config(config, tokenizer, stage).mid_level_dataset_surplus
        targets = [math.ceil(num_samples * w) for w in weights]
        sizes = [math.ceil(t * (1 + surplus)) for t in targets]
    datasets = []
    for (split, _), size in zip(members, sizes):
        documents = getattr(split, _attribute(stage))
        per_epoch = (documents.tokens - 1) // length
        if stage != "valid" and config.stage_split == "epochs":
            log_single_rank(
                logger,
                logging.INFO,
                f"{stage}: {size} samples of {length} tokens from '{split.prefix}': "
                f"{size * length / documents.tokens:.3f} passes over its {documents.tokens} training tokens",
            )
        elif stage != "valid" and size > per_epoch:
            log_single_rank(
                logger,
                logging.WARNING,
                f"{stage}: {size} samples requested from '{split.prefix}' but one pass over its "
                f"{documents.tokens} tokens gives {per_epoch}; its documents will repeat "
                f"(the paper sees each token once; --stage-split epochs runs its multi-epoch recipe)",
            )
        gpt_config = _gpt_config(config, tokenizer, stage, (documents.begin, documents.end), files[split.prefix])
        datasets.append(
            _build(
                StageGPTDataset,
                low_level[split.prefix],
                split.prefix,
                documents.indices(),
                size,
                index_split,
                gpt_config,
            )
        )
    if len(datasets) == 1:
        return datasets[0]
    blend_config = _gpt_config(config, tokenizer, stage)
    if not torch.distributed.is_initialized():
        # megatron-core 0.16.1 BlendedDataset calls torch.distributed.get_rank() on a cache miss,
        # which fails without a process group: build the (cheap) blend indices in memory instead.
        blend_config = dataclasses.replace(blend_config, path_to_cache=None)
    return _build(BlendedDataset, datasets, weights, sum(targets), blend_config)


def build_stage_datasets(config: StageDataConfig, tokenizer, num_samples: dict[str, int]):
    """Build the patch-stage, token-stage and validation datasets (see the module docstring).

    Args:
        config: the data configuration.
        tokenizer: a ``MegatronTokenizerBase`` with ``unique_identifiers``, ``eod`` and
            ``vocab_size`` (e.g. :class:`~megatron_patch.data.tokenizer.SentencePieceTokenizer`).
        num_samples: samples each dataset must provide: ``"patch_train"`` (of K·T tokens),
            ``"token_train"`` (T tokens) and ``"valid"`` (T tokens). A missing key or 0 skips
            that dataset (it is None), e.g. ``patch_train`` of a token-stage-only job; the stage
            document ranges and counts stay the same.

    Returns:
        StageDatasets: ``patch_train`` is None without a patch stage or when not asked for; ``token_train`` and
        ``valid`` are None when not asked for, ``valid`` also when the split gives validation no
        documents. Every rank gets the same datasets.

    Raises:
        DataError: a missing prefix, a split without training documents, a stage with fewer
            tokens than one sample, token ids beyond the tokenizer's vocabulary, or a bad
            ``num_samples`` (unknown key, negative count, no training sample at all).
    """
    for stage, value in num_samples.items():
        if stage not in STAGES or not isinstance(value, int) or value < 0:
            raise DataError(
                f"num_samples[{stage!r}] = {value!r}: keys must be {', '.join(STAGES)} and "
                f"values ints >= 0 (samples to provide; 0: stage not run)"
            )
    stages = [
        stage
        for stage in STAGES
        if num_samples.get(stage, 0) > 0 and (stage != "patch_train" or config.has_patch_stage)
    ]
    if not set(stages) - {"valid"}:
        raise DataError(
            f"num_samples {num_samples} asks for no training sample: give token_train > 0 "
            f"(or patch_train > 0 with a patch stage)"
        )
    for prefix in config.prefixes:
        check_prefix(prefix)
    check_cache_folder(config)
    low_level = {
        prefix: StageGPTDataset.build_low_level_dataset(prefix, _gpt_config(config, tokenizer, "token_train"))
        for prefix in dict.fromkeys(config.prefixes)
    }
    splits = plan_stage_split(config, low_level)
    files = on_rank_zero(prefix_files, list(low_level))
    for prefix, dataset in low_level.items():
        check_vocab(prefix, dataset.index.dtype, tokenizer.vocab_size, index_cache_folder(config, prefix))
    for split in splits:
        log_single_rank(
            logger,
            logging.INFO,
            f"{split.prefix} ({config.stage_split} split): patch docs [{split.patch.begin}, {split.patch.end}) "
            f"{split.patch.tokens} tokens, token docs [{split.token.begin}, {split.token.end}) "
            f"{split.token.tokens} tokens, valid docs [{split.valid.begin}, {split.valid.end}) "
            f"{split.valid.tokens} tokens",
        )
    for stage in stages:  # fail before building anything (and before any barrier)
        _members(config, stage, splits)
    datasets = dict.fromkeys(STAGES)
    for stage in stages:
        datasets[stage] = _build_stage(config, tokenizer, stage, splits, low_level, files, num_samples[stage])
    return StageDatasets(
        patch_train=datasets["patch_train"],
        token_train=datasets["token_train"],
        valid=datasets["valid"],
        patch_documents=sum(s.patch.documents for s in splits),
        token_documents=sum(s.token.documents for s in splits),
        patch_tokens=sum(s.patch.tokens for s in splits),
        token_tokens=sum(s.token.tokens for s in splits),
        splits=splits,
        stage_split=config.stage_split,
    )
