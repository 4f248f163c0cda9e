"""The run plan: every batch size, shape and step count of a two-stage run, computed once.

This module is the one place where the patch size K changes a batch or a shape. With T the
decoder length (``--seq-length``), G the token-stage global batch (``--global-batch-size``), N
the steps of both stages (``--train-iters``, or ``--train-tokens`` / (G*T)) and λ the patch
stage's share of the tokens::

    patch stage:  round(λN) steps of G/K samples of K*T tokens (T patches each)
    token stage:  N - round(λN) steps of G samples of T tokens
    validation:   token level, G samples of T tokens per batch, --eval-iters batches
                  (re-read from the start each time; at most MAX_PASSES passes over its documents)

Both training stages consume G*T tokens per step and the decoder always sees T positions, so the
pipeline schedule is given T in either stage. The budget split is the same whichever stages a job
runs (``--stage both|patch|token``).

``--stage-split`` says which documents the stages read. ``documents`` (single-epoch): the patch
stage the documents holding the first λ of the training tokens, the token stage the rest.
``epochs`` (the paper's multi-epoch recipe): both stages all training documents, so with W
training tokens the patch stage makes round(λN)*G*T / W passes over them and the token stage
(N - round(λN))*G*T / W; the budget must be at least one pass (N*G*T >= W).
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from megatron_patch.errors import ArgumentError

# the most passes over its documents a stage may ask for: beyond it the budget is a typo (megatron
# would build a sample index of that many passes, hundreds of GiB for --train-iters 1e12 on a small
# corpus), where the multi-epoch recipe asks for a handful
MAX_PASSES = 1000


@dataclass(frozen=True)
class StagePlan:
    """One stage's batches. Units: samples (sequences), tokens, decoder positions."""

    name: str  # "patch" | "token" | "valid"
    patch_size: int  # K: tokens averaged into one decoder position (1: token level)
    iterations: int  # steps (global batches)
    first_iteration: int  # global iteration number before the stage's first step
    samples_per_step: int  # samples in one global batch
    decoder_length: int  # T: positions the decoder sees per sample
    micro_batch_size: int  # samples per micro-batch
    num_microbatches: int  # micro-batches per step on each data-parallel rank

    @property
    def sample_tokens(self) -> int:
        """Tokens per sample: K*T."""
        return self.patch_size * self.decoder_length

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one global batch: (G/K) * K*T = G*T in both training stages."""
        return self.samples_per_step * self.sample_tokens

    @property
    def positions_per_step(self) -> int:
        """Decoder positions of one global batch (what model FLOPs scale with)."""
        return self.samples_per_step * self.decoder_length

    def samples_per_pass(self, tokens: int) -> int:
        """Samples one pass over documents of ``tokens`` tokens holds (a sample reads L + 1 tokens)."""
        return max(tokens - 1, 0) // self.sample_tokens

    @property
    def samples(self) -> int:
        """Samples the whole stage reads."""
        return self.iterations * self.samples_per_step


@dataclass(frozen=True)
class RunPlan:
    """The stages of one job and the budget they split (see the module docstring)."""

    patch_size: int  # K of the patch stage (1: token-only training)
    patch_data_fraction: float  # λ
    seq_length: int  # T
    global_batch_size: int  # G, token-stage samples per step
    data_parallel_size: int
    train_iters: int  # N, steps of both stages together
    patch_iters: int  # round(λN) (0 at K=1)
    stages: Tuple[StagePlan, ...]  # the stages this job runs, in order
    validation: StagePlan
    stage_split: str = "documents"  # documents | epochs (see the module docstring)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def token_iters(self) -> int:
        return self.train_iters - self.patch_iters

    @property
    def stage_ends(self) -> Tuple[int, ...]:
        """The global iteration at which each stage of this job ends (and is saved), in order: all
        but the last are stage boundaries, whose checkpoints pruning keeps."""
        return tuple(stage.first_iteration + stage.iterations for stage in self.stages)

    @property
    def theoretical_relative_cost(self) -> float:
        """Model FLOPs of this job's stages over token-level training of the same tokens: λ/K + 1 - λ
        for both stages, at the λ the steps realize (``round(λN) / N``: a short job's rounding moves
        it), 1/K for the patch stage alone, 1 for the token stage alone (a control arm, or token-only
        training)."""
        stages = {stage.name for stage in self.stages}
        if stages == {"patch", "token"}:
            fraction = self.patch_iters / self.train_iters
            return fraction / self.patch_size + 1 - fraction
        return 1 / self.patch_size if stages == {"patch"} else 1.0

    @property
    def train_tokens(self) -> int:
        """Tokens of the whole budget, both stages (N*G*T)."""
        return self.train_iters * self.tokens_per_step

    def stage_tokens(self) -> Dict[str, int]:
        """Tokens of each stage's share of the budget, whichever stages this job runs."""
        return {"patch": self.patch_iters * self.tokens_per_step, "token": self.token_iters * self.tokens_per_step}

    def epochs(self, data_tokens: Dict[str, int], consumed: Optional[Dict[str, int]] = None) -> Dict[str, float]:
        """Passes each stage makes over its documents: tokens it trains on (its share of the budget,
        or ``consumed``) over the tokens its documents hold (``data_tokens``: all training tokens
        for both stages in the epochs split, each stage's own range in the documents split)."""
        tokens = consumed if consumed is not None else self.stage_tokens()
        return {name: tokens.get(name, 0) / data_tokens[name] for name in ("patch", "token") if data_tokens.get(name)}

    def check_epoch_budget(self, training_tokens: int, data_path: str = "--data-path") -> None:
        """ArgumentError when the epochs split is given a budget under one pass over the W =
        ``training_tokens`` tokens of the training documents (the documents split then repeats
        nothing, and is what such a budget wants)."""
        if self.stage_split != "epochs" or self.train_tokens >= training_tokens:
            return
        needed = -(-training_tokens // self.tokens_per_step)
        raise ArgumentError(
            f"--stage-split epochs: the budget of {self.train_iters} steps ({self.train_tokens} tokens) is under one "
            f"pass over the {training_tokens} training tokens of {data_path}: train at least {needed} steps "
            f"(--train-iters) for the multi-epoch recipe, or use --stage-split documents"
        )

    def check_steps_fit(self, data_tokens: Dict[str, int], data_path: str = "--data-path") -> None:
        """ArgumentError when one optimizer step of a stage reads more samples than a pass over that
        stage's documents (``data_tokens``, as for :meth:`epochs`) holds: the same tokens would
        repeat inside one step (e.g. a --seq-length far beyond what a small corpus holds)."""
        for stage in self.stages:
            tokens = data_tokens.get(stage.name, 0)
            per_pass = stage.samples_per_pass(tokens)
            if per_pass >= stage.samples_per_step:
                if stage.samples > MAX_PASSES * per_pass:  # megatron's sample index would not fit in memory
                    raise ArgumentError(
                        f"--train-iters/--train-tokens: {self.train_iters} steps have the {stage.name} stage read "
                        f"its documents in {data_path} {stage.samples / per_pass:.3g} times ({stage.samples} "
                        f"samples, one pass holds {per_pass}); at most {MAX_PASSES} passes: lower the budget or "
                        f"add data"
                    )
                continue
            raise ArgumentError(
                f"--seq-length {self.seq_length}: one step of the {stage.name} stage reads "
                f"{stage.samples_per_step} samples of {stage.sample_tokens} tokens, but its documents "
                f"in {data_path} hold {tokens} tokens ({per_pass} samples), so tokens would repeat "
                f"within a step: lower --seq-length or --global-batch-size, or add data"
            )

    def check_validation_fits(self, valid_tokens: int, data_path: str = "--data-path", split: str = "") -> None:
        """ArgumentError when one validation (``--eval-iters`` global batches, read from the start of
        the validation documents each time) reads those documents, ``valid_tokens`` tokens, more
        than ``MAX_PASSES`` times: the training stages' limit (a typo such as ``--eval-iters
        100000``, whose every validation would re-read a few held-out documents for minutes). No
        validation documents (validation is off, which is said) or fewer than one sample's (a
        ``DataError`` when the datasets are built) are left to those checks."""
        validation = self.validation
        per_pass = validation.samples_per_pass(valid_tokens)
        if not validation.iterations or not per_pass or validation.samples <= MAX_PASSES * per_pass:
            return
        most = MAX_PASSES * per_pass // validation.samples_per_step
        raise ArgumentError(
            f"--eval-iters {validation.iterations}: one validation reads the validation documents of {data_path} "
            f"{validation.samples / per_pass:.3g} times ({validation.samples} samples of {validation.sample_tokens} "
            f"tokens, one pass holds {per_pass}); at most {MAX_PASSES} passes: lower --eval-iters (to {most} at "
            f"most), or give --split{' ' + split if split else ''} a larger validation share"
        )

    def stage(self, name: str) -> StagePlan:
        return next(stage for stage in self.stages if stage.name == name)

    def dataset_samples(self) -> Dict[str, int]:
        """Samples each dataset must provide (0: not built)."""
        samples = {"patch_train": 0, "token_train": 0, "valid": self.validation.samples}
        for stage in self.stages:
            samples[f"{stage.name}_train"] = stage.samples
        return samples

    def dataset_sample_tokens(self) -> Dict[str, int]:
        """Tokens per sample of each dataset: K*T for the patch stage, T otherwise."""
        return {
            "patch_train": self.patch_size * self.seq_length,
            "token_train": self.seq_length,
            "valid": self.seq_length,
        }


def make_plan(
    *,
    patch_size: int,
    patch_data_fraction: float,
    stages: str,
    seq_length: int,
    micro_batch_size: int,
    global_batch_size: int,
    data_parallel_size: int,
    eval_iters: int,
    train_iters: Optional[int] = None,
    train_tokens: Optional[int] = None,
    stage_split: str = "documents",
) -> RunPlan:
    """The plan of a job; ``stages`` is ``--stage`` (``both``, ``patch`` or ``token``),
    ``stage_split`` is ``--stage-split`` (``documents`` or ``epochs``).

    Raises ``ArgumentError`` (one line naming the flags to change) for batches that do not split
    into whole micro-batches on every data-parallel rank in both stages, and for budgets that
    leave a stage without steps.
    """
    K, G, b, dp = patch_size, global_batch_size, micro_batch_size, data_parallel_size
    if stage_split not in ("documents", "epochs"):
        raise ArgumentError(f"--stage-split {stage_split} must be documents or epochs")
    if G % (b * dp):
        raise ArgumentError(
            f"--global-batch-size {G} is not a multiple of micro-batch x data-parallel = {b} x {dp}: make it one"
        )
    if K > 1 and G % (K * b * dp):
        raise ArgumentError(
            f"--global-batch-size {G} must be a multiple of K x micro-batch x data-parallel = "
            f"{K} x {b} x {dp}, so the patch stage (G/K samples of K*T tokens) keeps the token "
            f"stage's tokens per step"
        )
    tokens_per_step = G * seq_length
    if train_tokens is not None:
        if train_tokens < tokens_per_step:
            raise ArgumentError(f"--train-tokens {train_tokens} is less than one step ({tokens_per_step} tokens)")
        train_iters = train_tokens // tokens_per_step
    if train_iters is None or train_iters < 1:
        raise ArgumentError(f"--train-iters {train_iters} must be >= 1")
    patch_iters = round(patch_data_fraction * train_iters) if K > 1 else 0
    if K > 1 and (patch_iters == 0 or patch_iters == train_iters):
        budget = f"--train-iters {train_iters}"
        if train_tokens is not None:  # the flag the user gave, and the steps it makes
            budget = (
                f"--train-tokens {train_tokens} ({train_iters} step{'s' * (train_iters != 1)} of {tokens_per_step})"
            )
        raise ArgumentError(
            f"{budget} with lambda={patch_data_fraction:.3f} leaves a stage with no steps: train longer"
        )

    def stage(name: str, stage_patch_size: int, iterations: int, first_iteration: int) -> StagePlan:
        samples = G // stage_patch_size
        return StagePlan(
            name, stage_patch_size, iterations, first_iteration, samples, seq_length, b, samples // (b * dp)
        )

    planned = []
    if K > 1 and stages in ("both", "patch"):
        planned.append(stage("patch", K, patch_iters, 0))
    if stages in ("both", "token"):
        planned.append(stage("token", 1, train_iters - patch_iters, patch_iters))
    return RunPlan(
        patch_size=K,
        patch_data_fraction=patch_data_fraction,
        seq_length=seq_length,
        global_batch_size=G,
        data_parallel_size=dp,
        train_iters=train_iters,
        patch_iters=patch_iters,
        stages=tuple(planned),
        validation=stage("valid", 1, eval_iters, 0),
        stage_split=stage_split,
    )
