"""The whole method end to end on the bundled corpus, on CPU: tokenizer -> .bin/.idx -> patch stage
(K=4, lambda=2/3, two processes at TP=2) -> checkpoint conversion -> token stage -> held-out
evaluation -> two comparisons on the same data -> a closing table.

    python examples/quickstart.py [--workdir quickstart_out] [--reduced]

The two comparisons: the *baseline* trains all the tokens token-only (the cost patch training
saves), and the *control* trains the token stage alone from random initialisation on the same
last 1-lambda of the tokens with the same schedule (``--stage token`` without
``--pretrained-checkpoint``). control loss - (patch + token) loss is the transfer of the patch
stage: positive means the patch stage helped the token stage, negative means it hurt.

Every step is the project's real command (tools/*.py, torchrun examples/pretrain_patch_gpt.py)
run as a subprocess; a step whose output already exists is skipped, so a re-run resumes. A trainer
run counts as done once its summary.json says it trained to the end; every run passes ``--load`` of
its own ``--save`` folder, so one killed (or stopped by a signal) after a checkpoint resumes from it.
``--reduced`` is the same pipeline with fewer steps, evaluated on 3 of the held-out documents (what CI runs).
"""

import json
import lzma
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pipeline.py beside it

from pipeline import (  # noqa: E402
    PATCH_SIZE,
    REPO,
    StepError,
    check_workdir,
    made_after_run,
    run_script,
    run_step,
    train_command,
    trained,
)

from megatron_patch.errors import VerificationError  # noqa: E402
from megatron_patch.runtime import atomic_file  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser  # noqa: E402

CORPUS = REPO / "examples" / "data" / "tiny.jsonl.xz"
HELD_OUT_EVERY = 10  # every 10th document (after a seeded shuffle) is held out for evaluation
SEED = 1234
PATCH_FRACTION = 2 / 3
EVAL_MICRO_BATCH = 32  # windows; at evaluate.py's default of 4 a CPU evaluation is mostly gloo calls


def settings(reduced: bool) -> dict:
    """Model, tokenizer vocabulary, T (tokens), steps of both stages together, warmup steps, peak lr,
    held-out documents evaluated (None: all)."""
    if reduced:  # 3 of the 10 held-out documents (~24k tokens, about what the runs train on)
        return {
            "model": "tiny",
            "seq_length": 64,
            "vocab": 1000,
            "train_iters": 24,
            "warmup": 4,
            "lr": "2e-3",
            "eval_documents": 3,
        }
    return {
        "model": "cpu-small",
        "seq_length": 128,
        "vocab": 2000,
        "train_iters": 300,
        "warmup": 20,
        "lr": "2e-3",
        "eval_documents": None,
    }


def _split_corpus(work: Path) -> None:
    train, held_out = work / "train.jsonl", work / "heldout.jsonl"
    if train.exists() and held_out.exists():
        return
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    # the bundled corpus is in reading order (book by book); shuffle the documents, as a real
    # training mix is, so that the patch stage's first lambda and the rest hold the same mix
    random.Random(SEED).shuffle(lines)
    for path, keep in (
        (train, lambda i: i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1),
        (held_out, lambda i: i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1),
    ):
        atomic_file.write_text(path, "".join(line for i, line in enumerate(lines) if keep(i)))
    print(
        f"== corpus: {len(lines)} documents shuffled (seed {SEED}), every {HELD_OUT_EVERY}th held out for evaluation",
        flush=True,
    )


def prepare_data(work: Path, s: dict) -> dict:
    """Held-out split, tokenizer and ``.bin/.idx`` in ``work``: ``{tokenizer, prefix, heldout}`` paths."""
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    _split_corpus(work)
    tokenizer = work / "tokenizer.model"
    run_step(
        "tokenizer",
        [
            py,
            "tools/train_tokenizer.py",
            "--input",
            work / "train.jsonl",
            "--vocab-size",
            s["vocab"],
            "--output-prefix",
            work / "tokenizer",
        ],
        tokenizer,
    )
    prefix = work / "data" / "train_text_document"
    (work / "data").mkdir(exist_ok=True)
    run_step(
        "preprocess",
        [
            py,
            "tools/preprocess_data.py",
            "--input",
            work / "train.jsonl",
            "--output-prefix",
            work / "data" / "train",
            "--tokenizer-model",
            tokenizer,
            "--append-eod",
            "--workers",
            "2",
        ],
        Path(str(prefix) + ".idx"),
    )
    return {"tokenizer": tokenizer, "prefix": prefix, "heldout": work / "heldout.jsonl"}


def training_flags(s: dict, data: dict, tensor_parallel: int, patch_fraction: float = PATCH_FRACTION) -> list:
    """The trainer flags every quick-start run shares: model, data, batch (16 x T tokens), budget, schedule."""
    return [
        "--cpu",
        "--model",
        s["model"],
        "--seq-length",
        s["seq_length"],
        "--tensor-model-parallel-size",
        tensor_parallel,
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "16",
        "--train-iters",
        s["train_iters"],
        "--lr",
        s["lr"],
        "--min-lr",
        "1e-4",
        "--lr-warmup-iters",
        s["warmup"],
        "--data-path",
        data["prefix"],
        "--split",
        "100,0,0",
        "--eval-iters",
        "0",
        "--tokenizer-model",
        data["tokenizer"],
        "--log-interval",
        max(1, s["train_iters"] // 15),
        "--patch-data-fraction",
        patch_fraction,
    ]


def _torchrun(nproc: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def main(argv=None) -> int:
    return run_script(lambda: _main(argv))


def _main(argv) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO / "quickstart_out"))
    parser.add_argument("--reduced", action="store_true", help="fewer steps, 3 held-out documents, same pipeline (CI)")
    args = parser.parse_args(argv)
    s = settings(args.reduced)
    work = Path(args.workdir).resolve()
    check_workdir(work, s, "quickstart")
    data = prepare_data(work, s)
    common = training_flags(s, data, tensor_parallel=2)
    runs = {name: work / name for name in ("patch_stage", "token_init", "token_stage", "control", "baseline")}

    def train_step(title: str, name: str, flags: list) -> None:
        """A trainer run saving to ``runs[name]``; done once it has trained to its end."""
        run_step(title, train_command(_torchrun(2), common + flags, runs[name]), runs[name], finished=trained)

    train_step("patch stage (K=4, TP=2)", "patch_stage", ["--patch-size", PATCH_SIZE, "--stage", "patch"])
    for derived in ("token_init", "token_stage"):  # made from the patch stage: not to be reused after a retraining
        if runs[derived].exists() and not made_after_run(runs[derived], runs["patch_stage"]):
            raise StepError(
                f"{runs[derived]} is older than the patch stage's run ({runs['patch_stage']}), trained again since: "
                f"remove {runs['token_init']} and {runs['token_stage']}, then re-run"
            )
    run_step(
        "convert patch checkpoint -> token-stage start",
        _torchrun(2)
        + [
            "tools/convert_checkpoint.py",
            "--cpu",
            "--load",
            runs["patch_stage"],
            "--save",
            runs["token_init"],
            "--tensor-model-parallel-size",
            "2",
        ],
        runs["token_init"],
    )
    token_stage = ["--patch-size", PATCH_SIZE, "--stage", "token"]
    train_step("token stage (TP=2)", "token_stage", token_stage + ["--pretrained-checkpoint", runs["token_init"]])
    # the same token stage (same documents, steps and schedule) from random initialisation
    train_step("control: the token stage alone, from scratch (TP=2)", "control", token_stage)
    train_step("baseline: the same tokens token-only (TP=2)", "baseline", ["--patch-size", "1"])
    evaluated = ("token_stage", "control", "baseline")
    outputs = {name: work / f"eval_{name}.json" for name in evaluated}

    def scored(name: str) -> bool:
        return made_after_run(outputs[name], runs[name])

    pending = [name for name in evaluated if not scored(name)]  # one model build for all of them
    run_step(
        f"evaluate {', '.join(pending or evaluated)} on held-out documents (TP=2)",
        _torchrun(2)
        + ["tools/evaluate.py", "--cpu", "--load", *(runs[name] for name in pending)]
        + ["--input", data["heldout"], "--tokenizer-model", data["tokenizer"], "--tensor-model-parallel-size", "2"]
        + ["--micro-batch-size", EVAL_MICRO_BATCH, "--output-json", *(outputs[name] for name in pending)]
        + (["--max-documents", s["eval_documents"]] if s["eval_documents"] else []),
        outputs[(pending or evaluated)[-1]],
        finished=lambda done: all(scored(name) for name in pending),
    )
    evaluations = {name: json.loads(outputs[name].read_text()) for name in evaluated}
    held_out = sum(1 for line in data["heldout"].read_text(encoding="utf-8").splitlines() if line.strip())
    _report(runs, evaluations, held_out, args.reduced)
    return 0


def _outcome(difference: float, above: str, below: str) -> str:
    """``above`` for a positive difference, ``below`` for a negative one, neither for exactly 0."""
    return above if difference > 0 else below if difference < 0 else f"neither {above} nor {below}"


def _same_tokens(summary: dict, evaluations: dict) -> None:
    """VerificationError unless patch + token trained the baseline's tokens, the control the token
    stage's, and every run was scored on the same held-out tokens: the comparisons assume it."""
    patch, token = summary["patch_stage"]["total_tokens"], summary["token_stage"]["total_tokens"]
    baseline, control = summary["baseline"]["total_tokens"], summary["control"]["total_tokens"]
    scored = {name: (e["documents"], e["tokens"]) for name, e in evaluations.items()}
    if patch + token != baseline or control != token or len(set(scored.values())) > 1:
        raise VerificationError(
            f"the runs are not comparable: patch + token trained {patch} + {token} tokens, the baseline "
            f"{baseline}, the control {control} (the token stage's {token}); held-out (documents, tokens) "
            f"scored: {scored}; remove the workdir's outputs of other settings and re-run"
        )


def _report(runs: dict, evaluations: dict, held_out: int, reduced: bool) -> None:
    """The closing table and what it means, from the runs' summaries and evaluations; ``held_out``:
    the documents of the held-out file."""
    names = ("patch_stage", "token_stage", "control", "baseline")
    summary = {name: json.loads((runs[name] / "summary.json").read_text()) for name in names}
    _same_tokens(summary, evaluations)
    patch_seconds = summary["patch_stage"]["stages"]["patch"]["seconds"]
    token_seconds = summary["token_stage"]["stages"]["token"]["seconds"]
    control_seconds = summary["control"]["stages"]["token"]["seconds"]
    baseline_seconds = summary["baseline"]["stages"]["token"]["seconds"]
    patch_flops = (
        summary["patch_stage"]["stages"]["patch"]["flops"] + summary["token_stage"]["stages"]["token"]["flops"]
    )
    baseline_flops = summary["baseline"]["stages"]["token"]["flops"]
    # the trainer's theoretical cost of each job, against token-level training of that job's own
    # tokens (1/K for the patch stage, 1 for the token stage), weighted by the tokens: lambda/K + 1 -
    # lambda at the lambda the steps realise, against the baseline (token-level training of them all)
    patch_tokens, token_tokens = summary["patch_stage"]["total_tokens"], summary["token_stage"]["total_tokens"]
    total_tokens = patch_tokens + token_tokens
    theory = (
        summary["patch_stage"]["theoretical_relative_cost"] * patch_tokens
        + summary["token_stage"]["theoretical_relative_cost"] * token_tokens
    ) / total_tokens
    scored = evaluations["baseline"]
    rows = [
        ("patch (K=4, lambda=2/3) + token", evaluations["token_stage"], f"{patch_seconds:.1f} + {token_seconds:.1f}"),
        ("control: token stage from scratch", evaluations["control"], f"{control_seconds:.1f}"),
        ("token-only baseline, all tokens", evaluations["baseline"], f"{baseline_seconds:.1f}"),
    ]
    print(
        f"\n== result{' of the --reduced quick start (fewer steps)' if reduced else ''}: model {scored['model']} "
        f"({scored['dtype']}, CPU, TP=2); token-level loss on {scored['documents']} of the {held_out} held-out "
        f"documents ({scored['tokens']:,} tokens)"
    )
    print(f"{'run':34s} {'loss':>8s} {'ppl':>9s} {'train s':>14s}")
    for name, evaluation, seconds in rows:
        print(f"{name:34s} {evaluation['loss']:8.4f} {math.exp(evaluation['loss']):9.2f} {seconds:>14s}")
    transfer = evaluations["control"]["loss"] - evaluations["token_stage"]["loss"]
    print(f"transfer of the patch stage = control - (patch + token) = {transfer:+.4f} nats")
    print(
        f"relative cost of patch + token against the token-only baseline: measured wall time "
        f"{(patch_seconds + token_seconds) / baseline_seconds:.3f}, model FLOPs {patch_flops / baseline_flops:.3f}, "
        f"theory lambda/K + 1 - lambda = {theory:.3f} (the trainer's, at the realised lambda "
        f"{patch_tokens / total_tokens:.3f})"
    )
    print(
        f"(patch + token train {patch_tokens:,} + {token_tokens:,} = {total_tokens:,} tokens, the baseline the "
        f"same {summary['baseline']['total_tokens']:,}, the control the last {summary['control']['total_tokens']:,} "
        f"of them; step times exclude start-up and checkpointing)"
    )
    versus = evaluations["token_stage"]["loss"] - evaluations["baseline"]["loss"]
    print(
        f"What this means: the patch stage {_outcome(transfer, 'helped', 'hurt')} the token stage that followed "
        f"it ({transfer:+.2f} nats against the same token stage from scratch), and patch + token ended "
        f"{abs(versus):.2f} nats {_outcome(versus, 'worse', 'better')} than token-only training of all the tokens; "
        f"the paper finds patch training pays only with hundreds of training tokens per parameter, far above "
        f"this corpus (README, 'What to expect')."
    )


if __name__ == "__main__":
    sys.exit(main())
