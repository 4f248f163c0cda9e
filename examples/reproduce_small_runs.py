"""The runs of the small-scale reproduction (``reproduce_small.py``): their names, the model, data and
budget they share (full or reduced), each run's trainer flags, its folder, and the token budget of a
multi-epoch recipe. (A run's theoretical cost is the trainer's, in its summary.json.)

A patch run ``lambda-X`` trains the first X of the tokens at patch level (K=4) and the rest at token
level; its control ``control-lambda-X`` trains only that token stage, from random initialisation.
"""

import math
import re
from pathlib import Path

from pipeline import PATCH_SIZE

SPLIT = "99,1,0"  # train, valid, test shares of the documents (1% for in-run validation)
FRACTIONS = {"lambda-1_4": 0.25, "lambda-1_2": 0.5, "lambda-2_3": 2 / 3, "lambda-4_5": 0.8}
CONTROLS = {f"control-{name}": fraction for name, fraction in FRACTIONS.items()}
RUN_NAMES = ("token-only",) + tuple(FRACTIONS) + tuple(CONTROLS)


def settings(reduced: bool, cpu: bool) -> dict:
    """Model, tokenizer, batch and budget of the reproduction (``reduced``: the smoke run), and the
    device (``cpu``: fp32 on CPU, else bf16 on GPUs); what a workdir's settings record holds.

    The global batch is 32 sequences of 1024 tokens in every run; the micro-batch of 8 lets the
    patch stage split it as GBS/K = 8 sequences of K*T tokens (the trainer requires K x mbs | GBS).
    """
    device = {"reduced": reduced, "cpu": cpu}
    if reduced:
        return {
            **device,
            "model": "tiny",
            "seq_length": 64,
            "vocab": 1000,
            "gbs": 16,
            "mbs": 4,
            "train_tokens": 16 * 64 * 24,
            "warmup": 4,
            "lr": "2e-3",
            "eval_interval": 8,
            "max_documents": 4,
            "eval_mbs": 32,  # windows per evaluation micro-batch (evaluate.py's default 4 is slow on CPU)
            "sample_lines": 2000,
            "train_file": "tiny.jsonl.xz",
        }
    return {
        **device,
        "model": "repro-34m",
        "seq_length": 1024,
        "vocab": 8000,
        "gbs": 32,
        "mbs": 8,
        "train_tokens": None,
        "warmup": 100,
        "lr": "1e-3",
        "eval_interval": 50,
        "max_documents": None,
        "eval_mbs": None,  # evaluate.py's default
        "sample_lines": 300000,
        "train_file": "train.jsonl.xz",
    }


def trainer_arguments(
    s: dict,
    prefix: Path,
    tokenizer: Path,
    train_tokens: int,
    cpu: bool,
    seed: int = 1,
    stage_split: str = "documents",
    eval_interval: int = None,
) -> dict:
    """Trainer flags of every run, by name: the same model, data, budget and schedule; only K,
    lambda and (for a control) the stage differ. ``stage_split`` is the trainer's
    ``--stage-split`` (``epochs`` for a multi-epoch budget); ``eval_interval`` overrides the
    settings' steps between in-run validations."""
    common = [
        "--model",
        s["model"],
        "--seq-length",
        s["seq_length"],
        "--micro-batch-size",
        s["mbs"],
        "--global-batch-size",
        s["gbs"],
        "--train-tokens",
        train_tokens,
        "--lr",
        s["lr"],
        "--min-lr",
        "0",
        "--lr-warmup-iters",
        s["warmup"],
        "--data-path",
        prefix,
        "--split",
        SPLIT,
        "--tokenizer-model",
        tokenizer,
        "--eval-interval",
        eval_interval or s["eval_interval"],
        "--eval-iters",
        "4",
        "--log-interval",
        "10",
        "--seed",
        seed,
        "--stage-split",
        stage_split,
    ]
    common += ["--cpu"] if cpu else ["--bf16"]
    runs = {"token-only": common + ["--patch-size", 1]}
    runs.update(
        {
            name: common + ["--patch-size", PATCH_SIZE, "--patch-data-fraction", fraction]
            for name, fraction in FRACTIONS.items()
        }
    )
    runs.update(
        {
            name: common + ["--patch-size", PATCH_SIZE, "--patch-data-fraction", fraction, "--stage", "token"]
            for name, fraction in CONTROLS.items()
        }
    )
    return runs


def run_folder(name: str, seed: int) -> str:
    """The run's folder name in --workdir (seed 1 keeps the plain name of earlier reports)."""
    return name if seed == 1 else f"{name}-seed{seed}"


def parse_run_folder(folder: str):
    """``(name, seed)`` of a folder ``run_folder`` names, or None for any other folder."""
    match = re.fullmatch(r"(.+?)(?:-seed([2-9]|[1-9][0-9]+))?", folder)
    name, seed = match[1], int(match[2] or 1)
    return (name, seed) if name in RUN_NAMES else None


def epoch_budget(training_tokens: int, epochs: float, tokens_per_step: int) -> int:
    """Training tokens of ``epochs`` passes over ``training_tokens``, rounded up to whole steps."""
    return math.ceil(epochs * training_tokens / tokens_per_step) * tokens_per_step
