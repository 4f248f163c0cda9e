"""What ``--async-save`` buys: the same trainer run saving synchronously and in the background.

Usage::

    python benchmarks/async_save.py --data-path DATA/tiny_text_document --tokenizer-model DATA/tok.model \\
        --model 370m --train-iters 9 --save-interval 2 --repeats 2 --output-json async_save.json

Runs ``examples/pretrain_patch_gpt.py`` (``--cpu`` unless ``--gpu``; one process) once per mode and
repeat, the modes in turn, on the same flags, each into a fresh ``--save`` folder (kept with
``--work-dir``; ``--keep-last-checkpoints 1``, no validation), and prints per run:

* ``wall s``: the trainer process's wall time, start-up included (the same in both modes);
* ``steps s``: the sum of its step times (the summary's ``seconds`` of both stages: what a writer
  running beside the steps slows down);
* ``waited s``: the time training waited for saves: every save's ``seconds`` when synchronous; with
  ``--async-save`` the interval saves' ``blocked_seconds`` (building the state dict, the copy to host
  memory, the fork, and waiting for the previous background save) plus the final save's ``seconds``
  (synchronous in both modes);
* ``save s``: the mean of the interval saves' ``seconds``, from the save's start to its completion;
* ``peak PSS MB``: the largest sum of the proportional set sizes of the trainer's process tree,
  sampled every ``--interval`` s (a forked writer shares the trainer's pages until either writes
  them, so this counts what the background copy costs in host memory).

Figures are printed (and written with ``--output-json``), never stored in this script. Bad flags:
one ``error:`` line, exit 2; a failed run: its last output line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):  # the package, and common.py beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import command_line, environment, write_json  # noqa: E402
from preprocess_memory import measure_run  # noqa: E402

from megatron_patch.errors import UserError  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser, run_main  # noqa: E402

ENTRY = str(REPO_ROOT / "examples" / "pretrain_patch_gpt.py")
MODES = ("sync", "async")


def parse_options(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True, help="indexed dataset prefix (.bin/.idx)")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model of the dataset")
    parser.add_argument("--model", default="370m", help="model preset")
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--train-iters", type=int, default=9, help="K=4, lambda=2/3: 6 patch + 3 token steps")
    parser.add_argument("--save-interval", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, the modes in turn")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU (default: --cpu)")
    parser.add_argument("--work-dir", default=None, help="keep the runs' --save folders here (default: removed)")
    parser.add_argument("--output-json", default=None)
    opts = parser.parse_args(argv)
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "train_iters", "save_interval", "repeats"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(opts, name)} must be >= 1")
    return opts


def trainer_argv(opts, save: Path, mode: str) -> list[str]:
    return [
        sys.executable,
        ENTRY,
        *([] if opts.gpu else ["--cpu"]),
        *("--model", opts.model, "--seq-length", str(opts.seq_length)),
        *("--micro-batch-size", str(opts.micro_batch_size), "--global-batch-size", str(opts.global_batch_size)),
        *("--train-iters", str(opts.train_iters), "--lr", "3e-4", "--lr-warmup-iters", "1"),
        *("--data-path", opts.data_path, "--split", "97,3,0", "--tokenizer-model", opts.tokenizer_model),
        *("--eval-iters", "0", "--log-interval", "1", "--save", str(save)),
        *("--save-interval", str(opts.save_interval), "--keep-last-checkpoints", "1"),
        *(["--async-save"] if mode == "async" else []),
    ]


def run_figures(save: Path, mode: str) -> dict:
    """The figures of one finished run, from its ``metrics.jsonl``."""
    with open(save / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    saves = [r for r in records if r["kind"] == "checkpoint"]
    summary = next(r for r in records if r["kind"] == "summary")
    interval = saves[:-1]  # the last is the run's final save, synchronous in both modes
    waited = sum(r.get("blocked_seconds", r["seconds"]) for r in saves)
    if mode == "async" and not all("blocked_seconds" in r for r in interval):
        raise RuntimeError(f"{save}: an interval save of the --async-save run was not written in the background")
    return {
        "steps_s": sum(stage["seconds"] for stage in summary["stages"].values()),
        "waited_s": waited,
        "saves": len(saves),
        "save_s_mean": sum(r["seconds"] for r in interval) / len(interval) if interval else None,
        "blocked_s": [r.get("blocked_seconds") for r in interval],
    }


def measure(opts, work: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TORCHDYNAMO_DISABLE="1")
    os.environ.update(env)  # measure_run's wrapper passes its environment on
    rows = []
    for repeat in range(opts.repeats):
        for mode in MODES:
            save = work / f"{mode}-{repeat}"
            shutil.rmtree(save, ignore_errors=True)
            try:
                run = measure_run(trainer_argv(opts, save, mode), opts.interval)
            except RuntimeError as error:  # the trainer's own error is its output's last line
                lines = [line for line in str(error).splitlines() if line.strip() and "maxrss_kib" not in line]
                raise UserError(f"the {mode} run failed: {lines[-1] if lines else error}") from None
            rows.append(
                {"mode": mode, "repeat": repeat, "wall_s": run["wall_s"], "peak_pss_mb": run["peak_pss_mb"]}
                | run_figures(save, mode)
            )
            print(f"{mode} run {repeat + 1}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    return run_main(lambda: _async_save(argv))


def _async_save(argv: list[str]) -> int:
    opts = parse_options(argv)
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="async-save-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = measure(opts, work)
    finally:
        if not opts.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    env = environment(cpu=not opts.gpu)
    print(command_line("async_save.py", argv))
    print(
        f"{env['date_utc']}; {env['device']}; Python {env['python']}, torch {env['torch']}, "
        f"megatron-core {env['megatron_core']}; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    print()
    print("| mode | run | wall s | steps s | waited s | saves | save s (mean) | peak PSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        save_s = "" if r["save_s_mean"] is None else f"{r['save_s_mean']:.2f}"
        print(
            f"| {r['mode']} | {r['repeat'] + 1} | {r['wall_s']:.1f} | {r['steps_s']:.1f} | {r['waited_s']:.2f} | "
            f"{r['saves']} | {save_s} | {r['peak_pss_mb']:.0f} |"
        )
    if opts.output_json:
        write_json(opts.output_json, {"command": command_line("async_save.py", argv), "environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
