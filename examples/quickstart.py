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

import argparse
import json
import lzma
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from megatron_patch.runtime import atomic_file

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tiny.jsonl.xz"
HELD_OUT_EVERY = 10  # every 10th document (after a seeded shuffle) is held out for evaluation
SEED = 1234
PATCH_SIZE, PATCH_FRACTION = 4, 2 / 3
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


def check_workdir(work: Path, made_with: dict, script: str) -> None:
    """Record in ``work/settings.json`` what ``work``'s outputs are made with, or exit with one line
    when it holds another record: a step whose output exists is not run again, so a workdir of other
    settings (another mode, budget or corpus) would have its results reported as this run's."""
    made_with = json.loads(json.dumps(made_with, default=str))  # as it reads back
    record = work / "settings.json"
    if record.exists():
        before = json.loads(record.read_text())
        keys = sorted({*before, *made_with})
        changed = [f"{k} {before.get(k)!r} -> {made_with.get(k)!r}" for k in keys if before.get(k) != made_with.get(k)]
        if changed:
            sys.exit(
                f"{script}: --workdir {work} holds outputs made with other settings ({'; '.join(changed)}): "
                f"use another --workdir, or delete it to start over"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(record.name + ".tmp")
    partial.write_text(json.dumps(made_with, indent=1, sort_keys=True) + "\n")
    os.replace(partial, record)


def trained(save: Path) -> bool:
    """The trainer run saving to ``save`` trained to its end: its summary.json exists and is not
    marked ``interrupted`` (the trainer writes one too when a stop signal or --exit-duration-in-mins
    ends it early, after saving a checkpoint)."""
    summary = save / "summary.json"
    return summary.exists() and not json.loads(summary.read_text()).get("interrupted", True)


def train_command(launcher: list, flags: list, save: Path) -> list:
    """The trainer's command line for one run saving to ``save``, with ``--load`` of the same folder:
    the trainer resumes when the folder holds a checkpoint (a re-run after a kill) and starts fresh
    when it holds none; with ``--pretrained-checkpoint`` too, ``--load`` wins once it holds one."""
    outputs = ["--save", save, "--load", save, "--summary-json", save / "summary.json"]
    return [*launcher, "examples/pretrain_patch_gpt.py", *flags, *outputs]


CPU_ENV = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}  # each process one thread, no compiles


def run_step(step: str, command: list, done: Path, log: Path = None, finished=Path.exists, extra_env=CPU_ENV) -> None:
    """Run one pipeline step unless ``finished(done)`` (by default: its output ``done`` exists);
    stream its output (or write it to ``log``); ``extra_env``: set for the step (the quick start's
    CPU settings by default). Exits with one line when the step fails or ends unfinished."""
    if finished(done):
        print(f"== {step}: done already ({done.relative_to(REPO) if done.is_relative_to(REPO) else done})", flush=True)
        return
    print(f"== {step}: {' '.join(str(c) for c in command)}", flush=True)
    env = dict(os.environ, **extra_env, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    if log is None:
        result = subprocess.run([str(c) for c in command], cwd=REPO, env=env)
    else:
        with open(log, "w", encoding="utf-8") as out:
            result = subprocess.run([str(c) for c in command], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        where = f" (output in {log})" if log else " above"
        sys.exit(
            f"{Path(sys.argv[0]).stem}: step '{step}' failed with exit code {result.returncode}; fix the "
            f"error{where} and re-run"
        )
    if not finished(done):  # a trainer stopped by a signal saves, writes an interrupted summary and exits 0
        sys.exit(f"{Path(sys.argv[0]).stem}: step '{step}' stopped before its end; re-run to resume it")
    print(f"== {step}: {time.perf_counter() - start:.1f} s", flush=True)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    pending = [name for name in evaluated if not outputs[name].exists()]  # one model build for all of them
    run_step(
        f"evaluate {', '.join(pending or evaluated)} on held-out documents (TP=2)",
        _torchrun(2)
        + ["tools/evaluate.py", "--cpu", "--load", *(runs[name] for name in pending)]
        + ["--input", data["heldout"], "--tokenizer-model", data["tokenizer"], "--tensor-model-parallel-size", "2"]
        + ["--micro-batch-size", EVAL_MICRO_BATCH, "--output-json", *(outputs[name] for name in pending)]
        + (["--max-documents", s["eval_documents"]] if s["eval_documents"] else []),
        outputs[(pending or evaluated)[-1]],
    )
    evaluations = {name: json.loads(outputs[name].read_text()) for name in evaluated}
    _report(runs, evaluations)
    return 0


def _report(runs: dict, evaluations: dict) -> None:
    names = ("patch_stage", "token_stage", "control", "baseline")
    summary = {name: json.loads((runs[name] / "summary.json").read_text()) for name in names}
    patch_seconds = summary["patch_stage"]["stages"]["patch"]["seconds"]
    token_seconds = summary["token_stage"]["stages"]["token"]["seconds"]
    control_seconds = summary["control"]["stages"]["token"]["seconds"]
    baseline_seconds = summary["baseline"]["stages"]["token"]["seconds"]
    patch_flops = (
        summary["patch_stage"]["stages"]["patch"]["flops"] + summary["token_stage"]["stages"]["token"]["flops"]
    )
    baseline_flops = summary["baseline"]["stages"]["token"]["flops"]
    theory = PATCH_FRACTION / PATCH_SIZE + 1 - PATCH_FRACTION
    rows = [
        ("patch (K=4, lambda=2/3) + token", evaluations["token_stage"], f"{patch_seconds:.1f} + {token_seconds:.1f}"),
        ("control: token stage from scratch", evaluations["control"], f"{control_seconds:.1f}"),
        ("token-only baseline, all tokens", evaluations["baseline"], f"{baseline_seconds:.1f}"),
    ]
    print("\n== result (held-out documents, token level)")
    print(f"{'run':34s} {'loss':>8s} {'ppl':>9s} {'train s':>14s}")
    for name, evaluation, seconds in rows:
        print(f"{name:34s} {evaluation['loss']:8.4f} {math.exp(evaluation['loss']):9.2f} {seconds:>14s}")
    transfer = evaluations["control"]["loss"] - evaluations["token_stage"]["loss"]
    print(f"transfer of the patch stage = control - (patch + token) = {transfer:+.4f} nats")
    print(
        f"relative cost of patch training: measured wall time "
        f"{(patch_seconds + token_seconds) / baseline_seconds:.3f}, "
        f"model FLOPs {patch_flops / baseline_flops:.3f}, theory lambda/K + 1 - lambda = {theory:.3f}"
    )
    print(
        f"(patch + token and the baseline train the same {summary['baseline']['total_tokens']:,} tokens, the "
        f"control the last {summary['control']['total_tokens']:,} of them; step times exclude start-up and "
        f"checkpointing)"
    )
    versus = evaluations["token_stage"]["loss"] - evaluations["baseline"]["loss"]
    print(
        f"What this means: the patch stage {'helped' if transfer > 0 else 'hurt'} the token stage that followed "
        f"it ({transfer:+.2f} nats against the same token stage from scratch), and patch + token ended "
        f"{abs(versus):.2f} nats {'worse' if versus > 0 else 'better'} than token-only training of all the tokens; "
        f"the paper finds patch training pays only with hundreds of training tokens per parameter, far above "
        f"this corpus (README, 'What to expect')."
    )


if __name__ == "__main__":
    sys.exit(main())
