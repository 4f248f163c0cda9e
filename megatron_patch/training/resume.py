"""Where a run starts: the checkpoint ``--load`` names (or none, for a fresh start), and what a
checkpoint it resumes or starts the token stage from must share with the run.

A resume keeps the checkpoint's plan (budget, data, split, K, lambda, seed), its optimizer and
schedule settings (the loaded optimizer state carries them) and its tokenizer; a token stage
started with ``--pretrained-checkpoint`` continues the patch run's plan. The data is the same
corpus, not the same path: checkpoints record each ``--data-path`` prefix's document and token
counts and a digest of its document lengths in order, so a run whose corpus was moved to another
mount resumes (with a warning), and one whose corpus was rewritten under the same path (other
documents, or the same shuffled) does not. Each difference is one
``CheckpointError`` line. Which checkpoint ``--load`` names is decided on rank 0
(:func:`checkpoint_to_resume`, called through ``runtime.rank_zero.on_rank_zero``).
"""

import logging
import os
from typing import List, Optional

import torch.distributed as dist

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as ckpt
from megatron_patch.checkpoint.info import weights_stage
from megatron_patch.data.split import parse_data_path
from megatron_patch.errors import CheckpointError, DataError
from megatron_patch.training.config import CheckpointSettings
from megatron_patch.training.plan import RunPlan

logger = logging.getLogger(__name__)

PLAN_FLAGS = (
    "train_iters",
    "patch_size",
    "patch_data_fraction",
    "global_batch_size",
    "seq_length",
    "split",
    "stage_split",
    "seed",  # the order of the samples, which consumed_samples counts along
)
# the form of the optimizer's saved state (fp32 main parameters of bf16 weights; sharded over the
# data-parallel ranks or not), which a resume cannot convert
STATE_FLAGS = ("bf16", "use_distributed_optimizer")
# the corpus, per prefix of --data-path (the trainer records them): what identifies it on any path
CORPUS_FLAGS = ("data_documents", "data_tokens", "data_lengths_sha256")
# what a resume takes from the checkpoint's optimizer and scheduler state, whatever the flags say
# (megatron's scheduler reads the peak and final learning rates from the loaded parameter groups)
OPTIMIZER_FLAGS = (
    "lr",
    "min_lr",
    "lr_warmup_iters",
    "lr_decay_style",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
)


def check_same_flags(flags: dict, meta, names, source: str, fix: str) -> None:
    """CheckpointError unless every flag of ``names`` that the checkpoint ``source`` records has the
    value this run gives it."""
    saved = meta.get("args", {})
    for name in names:
        if name in saved and saved[name] != flags[name]:
            raise CheckpointError(
                f"{source} was written with --{name.replace('_', '-')} {saved[name]}, this run has {flags[name]}: {fix}"
            )


def _recorded(saved: dict) -> List[str]:
    """The corpus fields the checkpoint's args hold (older checkpoints hold fewer, or none)."""
    return [name for name in CORPUS_FLAGS if saved.get(name) is not None]


def _corpus(args: dict, names: List[str]) -> tuple:
    """(blend weights, then each of ``names`` per prefix) of the corpus ``args`` name."""
    return (parse_data_path(args["data_path"])[1], *(list(args[name]) for name in names))


def _paths(args: dict) -> str:
    paths = args["data_path"]
    return " ".join(map(str, paths)) if isinstance(paths, list) else str(paths)


def _corpus_change(saved: dict, flags: dict, names: List[str]) -> str:
    """What differs between the corpus the checkpoint records and this run's: the first prefix
    whose counts or document lengths differ, or the two --data-path values (another blend)."""
    before, now = _corpus(saved, names), _corpus(flags, names)
    if before[0] == now[0] and len(before[1]) == len(now[1]):
        before_prefixes, prefixes = parse_data_path(saved["data_path"])[0], parse_data_path(flags["data_path"])[0]
        for index, recorded in enumerate(zip(*before[1:])):
            found = tuple(column[index] for column in now[1:])
            if recorded != found:
                order = " (the same counts: other documents, or the same in another order)"
                return (
                    f"--data-path prefix {before_prefixes[index]} of {recorded[0]} documents, {recorded[1]} tokens; "
                    f"this run's {prefixes[index]} holds {found[0]} documents, {found[1]} tokens"
                    + (order if recorded[:2] == found[:2] else "")
                )
    return f"--data-path {_paths(saved)}, this run reads --data-path {_paths(flags)} (another blend)"


def data_difference(flags: dict, meta, source: str) -> Optional[str]:
    """None when this run reads the corpus the checkpoint ``source`` was trained on: its
    --data-path, or another path to a corpus of the same blend, the same document and token counts
    and the same document lengths in order per prefix (the corpus on another mount or machine,
    which a warning says); otherwise what differs. A checkpoint that does not record the counts
    must name the same --data-path."""
    saved = meta.get("args", {})
    if "data_path" not in saved:
        return None
    same_path = saved["data_path"] == flags["data_path"]
    names = _recorded(saved)
    if "data_documents" not in names or "data_tokens" not in names:
        if same_path:
            return None
        return (
            f"{source} was trained on --data-path {_paths(saved)}, this run reads --data-path {_paths(flags)} (a "
            f"checkpoint this old records no document counts to recognise a moved corpus: give the old path, "
            f"a symlink if need be)"
        )
    if _corpus(saved, names) != _corpus(flags, names):
        return f"{source} was trained on {_corpus_change(saved, flags, names)}"
    if not same_path:
        logger.warning(
            "%s was trained on --data-path %s; this run reads the same documents and tokens under %s",
            source,
            _paths(saved),
            _paths(flags),
        )
    return None


def check_ranks_read_one_corpus(record: dict, data_path) -> None:
    """DataError on every rank unless every rank's ``data_path`` holds the corpus rank 0's does
    (``record``: the counts and document-length digests per prefix): a node with a stale local
    copy would otherwise train on other samples. Collective."""
    corpus = [record[name] for name in CORPUS_FLAGS]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, corpus)
    other = next((rank for rank, found in enumerate(gathered) if found != gathered[0]), None)
    if other is not None:
        raise DataError(
            f"--data-path {' '.join(map(str, data_path))} holds another corpus on rank {other} "
            f"({gathered[other][0]} documents, {gathered[other][1]} tokens per prefix) than on rank 0 "
            f"({gathered[0][0]} documents, {gathered[0][1]} tokens): give every node the same files"
        )


def check_same_tokenizer(flags: dict, meta, source: str) -> None:
    """CheckpointError when the checkpoint ``source`` records another tokenizer vocabulary than
    ``--tokenizer-model``'s (ids would mean other pieces than the model learnt)."""
    saved = meta.get("args", {}).get("tokenizer_vocab_sha256")
    given = flags.get("tokenizer_vocab_sha256")
    if saved and given and saved != given:
        raise CheckpointError(
            f"{source} was trained with another tokenizer ({meta['args'].get('tokenizer_model')}, pieces sha256 "
            f"{saved[:12]}) than --tokenizer-model {flags['tokenizer_model']} (pieces sha256 {given[:12]}): "
            f"pass the one it was trained with"
        )


def checkpoint_to_resume(checkpoints: CheckpointSettings) -> Optional[str]:
    """Rank 0: the checkpoint directory ``--load`` names, or None for a fresh start; refuses a
    ``--save`` whose checkpoints would be mixed with this run's, and a ``--load`` that holds no
    checkpoint unless it is this run's ``--save`` (see :func:`_check_fresh_start_from`)."""
    load, save = checkpoints.load, checkpoints.save
    saved = folders.read_tracker(save) if save else None
    if load and (folders.read_tracker(load) is not None or os.path.exists(os.path.join(load, folders.METADATA))):
        found = folders.resolve_checkpoint(load)
        if not save:
            return found
        if os.path.realpath(os.path.dirname(found)) != os.path.realpath(save):
            if saved is not None and _started_from(save, load):  # the same command again (a requeue)
                logger.warning(
                    "--save %s holds this run's checkpoints (it started from --load %s): resuming from its latest, "
                    "iteration %s",
                    save,
                    load,
                    saved,
                )
                folders.repair_tracker(save)
                return folders.resolve_checkpoint(save)
            if saved is not None:
                raise CheckpointError(
                    f"--save {save} already holds checkpoints of another run (latest iteration {saved}) than "
                    f"--load {load}: use an empty --save directory"
                )
            return found
        iteration = ckpt.read_metadata(found).get("iteration")
        later = [n for n in folders.complete_iterations(save) if isinstance(iteration, int) and n > iteration]
        if later:
            raise CheckpointError(
                f"--load {load} is iteration {iteration} but --save {save} also holds the later checkpoints "
                f"{', '.join(map(str, later))} of the run it comes from, which this run would not overwrite: "
                f"to go back, pass a new --save folder (or move the later iter_N folders away)"
            )
        folders.repair_tracker(save)  # a kill between a save's rename and its tracker write
        return found
    if load:
        _check_fresh_start_from(load, save)
        logger.warning(
            "--load %s holds no checkpoint yet: starting %s",
            load,
            "from --pretrained-checkpoint" if checkpoints.pretrained_checkpoint else "from scratch",
        )
    if saved is not None:
        raise CheckpointError(
            f"--save {save} already holds checkpoints (latest iteration {saved}): pass --load {save} to "
            f"resume, or use an empty directory"
        )
    return None


def _check_fresh_start_from(load: str, save: Optional[str]) -> None:
    """CheckpointError unless a ``--load`` that holds no checkpoint may start the run afresh: only
    this run's own ``--save`` folder may (empty, or not created yet: the launch scripts pass
    ``--load X --save X`` from the first run on). A file, a folder that does not exist (a typo) or
    another folder without checkpoints (e.g. a Hugging Face export) is a mistake, not a fresh start."""
    if os.path.exists(load) and not os.path.isdir(load):
        raise CheckpointError(
            f"--load {load} is a file: name the --save folder of the run (or one iter_N folder in it) to resume from"
        )
    if save and os.path.realpath(load) == os.path.realpath(save):
        return
    if not os.path.isdir(load):
        raise CheckpointError(
            f"--load {load}: no such folder (and not this run's --save): name the run's --save folder, or drop "
            f"--load to start afresh"
        )
    raise CheckpointError(
        f"--load {load} holds no checkpoint (no {folders.TRACKER}, no complete iter_N, no {folders.METADATA}): "
        f"name the run's --save folder (or one iter_N folder in it), or drop --load to start afresh"
    )


def _started_from(save: str, load: str) -> bool:
    """True when the latest checkpoint of ``save`` belongs to a run that started from ``--load load``
    (a re-run, e.g. requeued, of the command that forked a run from another's checkpoint: it resumes
    from ``save``, not from ``load`` again)."""
    try:
        recorded = ckpt.read_metadata(folders.resolve_checkpoint(save)).get("args", {}).get("load")
    except CheckpointError:
        return False
    return isinstance(recorded, str) and os.path.realpath(recorded) == os.path.realpath(load)


def check_resumed_checkpoint(flags: dict, load: str, meta: dict, stage_names: List[str]) -> None:
    """CheckpointError unless the checkpoint ``--load`` names can resume this run: a trainer's
    checkpoint (not the conversion tool's weights), of the same tokenizer, plan, optimizer settings
    and optimizer state form (``--bf16``, ``--use-distributed-optimizer``), and of one of this run's
    stages."""
    if "conversion" in meta:
        raise CheckpointError(
            f"--load {load} is the conversion tool's output (weights only, no optimizer state): start the "
            f"token stage from it with --pretrained-checkpoint {load}"
        )
    check_same_tokenizer(flags, meta, "--load checkpoint")
    check_same_flags(
        flags,
        meta,
        PLAN_FLAGS + OPTIMIZER_FLAGS + STATE_FLAGS,
        "--load checkpoint",
        "resume with the same value (start a new --save directory to change it)",
    )
    difference = data_difference(flags, meta, "--load checkpoint")
    if difference:
        raise CheckpointError(
            f"{difference}: resume on the corpus it was trained on (start a new --save directory to train on another)"
        )
    stage = meta["progress"]["stage"]
    if stage not in stage_names:
        raise CheckpointError(
            f"--load {load} is a {stage}-stage checkpoint but this run has stages {stage_names}: use "
            f"--stage token --pretrained-checkpoint for a separate token stage"
        )


def check_token_stage_start(flags: dict, plan: RunPlan, path: str, meta: dict) -> None:
    """``--pretrained-checkpoint`` must hold the patch stage's weights (its checkpoint, or the
    conversion tool's copy of one) of the same K and lambda: the token stage's budget is the
    last 1 - lambda of ``--train-tokens``. A checkpoint from the middle of the patch stage is
    taken with a warning, as by the conversion tool."""
    progress = meta["progress"]
    stage, complete = weights_stage(meta)
    if stage != "patch":
        raise CheckpointError(
            f"--pretrained-checkpoint {path} holds {stage}-stage weights: start the token stage from the "
            f"patch stage's last checkpoint (its --save's iter_N at the stage boundary, which pruning keeps) "
            f"or from the conversion tool's output"
        )
    if complete is False:
        logger.warning("--pretrained-checkpoint %s is from the middle of the patch stage", path)
    for name, value in (
        ("patch_size", plan.patch_size),
        ("patch_data_fraction", plan.patch_data_fraction),
    ):
        if progress.get(name) is not None and progress[name] != value:
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"--pretrained-checkpoint {path} was trained with {flag} {progress[name]}, this run has "
                f"{value}: give the patch stage's value (it sets the token stage's share of --train-tokens)"
            )
    check_same_tokenizer(flags, meta, f"--pretrained-checkpoint {path}")
    # the token stage is the rest of the patch run's plan: its budget and split (K and lambda were
    # checked above, also for a converted checkpoint; not its seed) and its corpus, whose documents
    # after the patch stage's share it trains on; another corpus is only said (the user's choice)
    not_compared = ("seed", "patch_size", "patch_data_fraction")
    check_same_flags(
        flags,
        meta,
        [name for name in PLAN_FLAGS if name not in not_compared],
        f"--pretrained-checkpoint {path}",
        "give the patch run's value (the token stage trains on the rest of its plan)",
    )
    difference = data_difference(flags, meta, f"--pretrained-checkpoint {path}")
    if difference:
        logger.warning(
            "%s: the token stage takes the documents after the patch stage's share of this data, which must be the "
            "same corpus",
            difference,
        )
