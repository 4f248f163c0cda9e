"""The datasets a training run reads: each stage's documents planned from the ``.idx`` files,
checked against the run's plan and against every rank's corpus, then built.

The corpus record (:func:`corpus_record`) is what checkpoints keep of the ``--data-path`` prefixes,
so a resume can tell the same corpus on another path from another corpus
(:mod:`~megatron_patch.training.resume`).
"""

import logging

from megatron_patch.data.datasets import StageDataConfig, StageDatasets, build_stage_datasets, plan_stage_split
from megatron_patch.training import resume
from megatron_patch.training.config import TrainerConfig

logger = logging.getLogger(__name__)


def build_run_datasets(config: TrainerConfig, tokenizer) -> StageDatasets:
    """The patch, token and validation datasets of ``config``'s run, in samples of the plan's
    stages; ``ArgumentError`` / ``DataError`` (one line) when the corpus cannot feed the plan or
    the ranks were given different corpora."""
    plan, data = config.plan, config.data
    stage_config = StageDataConfig(
        data_path=list(data.data_path),
        split=data.split,
        sample_tokens=plan.dataset_sample_tokens(),
        patch_data_fraction=plan.patch_data_fraction if plan.patch_size > 1 else 0.0,
        seed=config.seed,
        cache_dir=data.cache_dir,
        stage_split=plan.stage_split,
    )
    splits = plan_stage_split(stage_config)  # before building anything: reads the .idx files only
    resume.check_ranks_read_one_corpus(corpus_record(splits), data.data_path)
    source = "--data-path " + " ".join(data.data_path)
    plan.check_epoch_budget(sum(split.train_tokens for split in splits), source)
    plan.check_steps_fit(stage_data_tokens(splits), source)
    plan.check_validation_fits(sum(split.valid.tokens for split in splits), source, data.split)
    datasets = build_stage_datasets(stage_config, tokenizer, plan.dataset_samples())
    if datasets.valid is None and plan.validation.iterations:
        logger.warning(
            "--split %s holds no validation documents: validation (--eval-iters %d) is off; give the split a "
            "validation share to validate",
            data.split,
            plan.validation.iterations,
        )
    planned = plan.epochs(stage_data_tokens(splits))
    logger.info(
        "--stage-split %s: %s over %d training tokens",
        plan.stage_split,
        ", ".join(f"{name} stage {epochs:.3f} epochs" for name, epochs in planned.items()),
        datasets.train_tokens,
    )
    return datasets


def corpus_record(splits) -> dict:
    """Each --data-path prefix's document and token counts and the digest of its document
    lengths: what identifies the corpus on any path (``resume.CORPUS_FLAGS``)."""
    return {
        "data_documents": [split.documents for split in splits],
        "data_tokens": [split.tokens for split in splits],
        "data_lengths_sha256": [split.lengths_sha256 for split in splits],
    }


def stage_data_tokens(splits) -> dict:
    """Tokens of the documents each stage reads, over the document ranges ``splits`` of every
    prefix (the plan's ``epochs`` divides by them; the epochs split gives both stages all)."""
    return {
        "patch": sum(split.patch.tokens for split in splits),
        "token": sum(split.token.tokens for split in splits),
    }
