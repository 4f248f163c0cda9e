"""Chaos trials: random kill -9 and SIGTERM against a tiny two-stage run, each resumed and compared
with the uninterrupted run.

    python benchmarks/chaos.py --data-path DIR/tiny_text_document --tokenizer-model DIR/tok.model \\
        --trials 30 --work-dir /tmp/chaos --output-json chaos.json

The run: the ``tiny`` preset, K=4, lambda=2/3, ``--train-iters 12`` (8 patch steps, then 4 token
steps), a checkpoint every 2 steps, on CPU, in three layouts (``--layouts``): ``tp1``, one
process (``python``); ``tp2``, TP=2 on two processes under ``torchrun``; ``dp2``, DP=2 on two (at
micro-batch 2; the replicas share the writing of every save), each in a process group of its own.
One uninterrupted run per layout is the reference. With ``--async-save`` the trials write their
interval saves in the background (the references stay synchronous, so their checkpoints are also
the check of the background ones). A trial picks a layout, a signal (SIGKILL or
SIGTERM), a target (the whole process group, as scancel or a SLURM time limit delivers it; under
torchrun also the launcher only, or the worker processes only) and a moment: a random iteration's
log record plus a random delay of up to 1.5 mean step times of the reference run (saves
included), so kills land inside steps, inside saves and at the stage switch alike.
The trial then resumes with ``--load`` (the first resume must complete the run; up to three are
made, so the other checks still compare a finished run) and checks:

* losses, gradient norms and learning rates of every iteration equal the reference's bit for bit
  (the last record per iteration of ``metrics.jsonl``);
* the final checkpoint equals the reference's (``megatron_patch.checkpoint.compare``: every shard
  byte for byte, RNG states included), and the tracker names it;
* nothing is left: no ``iter_*.tmp``, no process of the killed run's group (after either signal);
* after a SIGTERM: a checkpoint at the step where it stopped, written by every rank
  (each rank logs "stopped by SIGTERM"), and exit status 0 (under torchrun: the workers', and
  the launcher's when only the workers were signalled; a launcher that received the signal
  itself re-raises it and exits 1, which the table shows).

Prints one row per trial and a summary; ``--output-json`` keeps them. Exit status 1 when a trial
fails a check. Data: any ``.bin/.idx`` prefix and its SentencePiece model (the tests build them
from ``examples/data/tiny.jsonl.xz`` with tools/train_tokenizer.py and tools/preprocess_data.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    command_line,
    environment,
    tiny_run_flags,
    write_json,
)
from megatron_patch.checkpoint.folders import checkpoint_dir, tracker_value  # noqa: E402
from megatron_patch.errors import ArgumentError, CheckpointError  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser, run_main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(REPO, "examples", "pretrain_patch_gpt.py")
ITERS = 12
SAVE_INTERVAL = 2


# layout: (trainer processes, flags after the tiny run's)
LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "dp2": (2, ["--micro-batch-size", "2"]),  # K x micro-batch x DP = 16, the global batch
}


def run_args(opts, layout: str, save: str, trial: bool = True) -> List[str]:
    """The run's flags; a trial's (not the reference's) with ``--async-save`` when asked."""
    return [
        *tiny_run_flags(opts.data_path, opts.tokenizer_model, ITERS),
        "--eval-iters",
        "0",
        "--save-interval",
        str(SAVE_INTERVAL),
        "--keep-last-checkpoints",
        "0",
        *LAYOUTS[layout][1],
        *(["--async-save"] if trial and opts.async_save else []),
        "--save",
        save,
    ]


def processes(layout: str) -> int:
    return LAYOUTS[layout][0]


def launch(layout: str, args: List[str], log_path: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
    launcher = (
        [sys.executable]
        if processes(layout) == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes(layout)}"]
    )
    log = open(log_path, "a")
    return subprocess.Popen(
        [*launcher, ENTRY, *args], cwd=REPO, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
    )


def records(save: str) -> dict:
    """The last ``train`` record per iteration of ``save/metrics.jsonl`` (resumed steps repeat)."""
    found = {}
    path = os.path.join(save, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if record.get("kind") == "train":
                    found[record["iteration"]] = record
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(pgid: int, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.05)
    return False


def reference_run(opts, layout: str) -> dict:
    """The uninterrupted run at this layout: its --save folder, records and training span (s)."""
    save = os.path.join(opts.work_dir, f"reference-{layout}")
    log = save + ".log"
    _remove(save, log)
    start = time.time()
    process = launch(layout, run_args(opts, layout, save, trial=False), log)
    first_step = None
    while process.poll() is None:
        if first_step is None and records(save):
            first_step = time.time()
        time.sleep(0.01)
    if process.returncode != 0:
        raise RuntimeError(f"the reference run of layout {layout} failed (exit {process.returncode}); see {log}")
    return {
        "save": save,
        "records": records(save),
        "first_step": (first_step or start) - start,
        "end": time.time() - start,
    }


def resume_until_done(opts, layout: str, save: str, log: str, limit: int = 3) -> List[int]:
    codes = []
    while len(codes) < limit:
        process = launch(layout, run_args(opts, layout, save) + ["--load", save], log)
        codes.append(process.wait())
        if codes[-1] == 0:
            break
    return codes


def tracker(save: str) -> Optional[int]:
    """The iteration ``save``'s tracker file names; None when there is none or it names no
    iteration (the trial's checks then fail on it)."""
    try:
        return tracker_value(save)
    except CheckpointError:
        return None


def check(trial: dict, reference: dict, save: str) -> List[str]:
    """The checks of the module docstring that do not depend on the signal; one line per failure."""
    from megatron_patch.checkpoint.compare import differences

    problems = []
    got, want = records(save), reference["records"]
    if sorted(got) != sorted(want):
        problems.append(f"iterations {sorted(set(want) - set(got))} missing")
    for iteration in sorted(set(got) & set(want)):
        for key in ("loss", "patch_loss", "grad_norm", "lr"):
            if got[iteration].get(key) != want[iteration].get(key):
                problems.append(f"iteration {iteration} {key} {got[iteration].get(key)} vs {want[iteration].get(key)}")
                break
    if tracker(save) != ITERS:
        problems.append(f"tracker names {tracker(save)}, not {ITERS}")
    final = checkpoint_dir(save, ITERS)
    if os.path.isdir(final):
        problems += differences(checkpoint_dir(reference["save"], ITERS), final)[:3]
    else:
        problems.append(f"{final} missing")
    left = [name for name in os.listdir(save) if name.endswith(".tmp")]
    if left:
        problems.append(f"left behind: {left}")
    return problems


def workers(launcher_pid: int) -> list:
    """The trainer processes torchrun started (its children running the entry point)."""
    import psutil

    return [p for p in psutil.Process(launcher_pid).children() if ENTRY in " ".join(p.cmdline())]


def run_trial(opts, index: int, rng: random.Random, references: dict) -> dict:
    layout = rng.choice(opts.layouts)
    ranks = processes(layout)
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    target = rng.choice(["group", "launcher", "workers"]) if ranks > 1 else "group"
    reference = references[layout]
    step = (reference["end"] - reference["first_step"]) / ITERS  # seconds per step, saves included
    after, extra = rng.randint(1, ITERS), rng.uniform(0.0, 1.5 * step)
    save = os.path.join(opts.work_dir, f"trial-{index:03d}")
    log = save + ".log"
    _remove(save, log)  # an earlier run's (same --work-dir): its lines would be read as this trial's
    trial = {
        "trial": index,
        "layout": layout,
        "signal": sig.name,
        "target": target,
        "after_iteration": after,
        "extra_s": round(extra, 2),
    }
    process = launch(layout, run_args(opts, layout, save), log)
    while process.poll() is None and max(records(save), default=0) < after:
        time.sleep(0.005)
    deadline = time.time() + extra
    while time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    trial["killed_at_iteration"] = max(records(save), default=0)
    if process.poll() is None:
        if target == "group":
            os.killpg(process.pid, sig)
        elif target == "launcher":
            os.kill(process.pid, sig)
        else:
            for worker in workers(process.pid):
                worker.send_signal(sig)
    else:
        trial["note"] = "run ended before the signal"
    try:
        code = process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
        trial["note"] = "did not end within 300 s of the signal"
    if sig == signal.SIGKILL and target == "launcher" and group_alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)  # workers orphaned by a killed torchrun: kill them as SLURM would
    trial["exit"] = code
    trial["group_gone"] = wait_group_gone(process.pid)
    with open(log) as f:
        output = f.read()
    trial["saved_at"] = tracker(save) if os.path.isdir(save) else None
    problems = []
    finished = trial["saved_at"] == ITERS and "stopped by SIGTERM" not in output
    if sig == signal.SIGTERM and "note" not in trial and finished:
        trial["note"] = "signal after the last step: the run finished"
    if sig == signal.SIGTERM and "note" not in trial:
        stopped = [re.search(rf"\[rank {r}\][^\n]*stopped by SIGTERM", output) for r in range(ranks)]
        failures = ("BrokenPipeError", "ChildFailedError", "[rank0]: Traceback", "[rank1]: Traceback")
        worker_ok = all(stopped) and not any(text in output for text in failures)
        if ranks == 1:
            worker_ok = worker_ok and "Traceback" not in output
        trial["workers_saved"] = worker_ok
        if not worker_ok:
            problems.append("not every rank saved and stopped on SIGTERM")
        if (ranks == 1 or target == "workers") and code != 0:
            problems.append(f"exit status {code} after SIGTERM")
        if trial["saved_at"] is None or f"stopped by SIGTERM at iteration {trial['saved_at']}" not in output:
            problems.append(f"no checkpoint at the stop step (tracker {trial['saved_at']})")
    if not trial["group_gone"]:  # after any signal: forked helpers end with their process (SIGKILL included)
        problems.append(f"processes left after {sig.name}")
    trial["resume_exits"] = resume_until_done(opts, layout, save, log)
    if trial["resume_exits"] != [0]:  # e.g. the --save lock still held by something the kill left
        problems.append(f"resume exit statuses {trial['resume_exits']}: the first resume did not finish the run")
    problems += check(trial, reference, save)
    trial["problems"] = problems
    trial["ok"] = not problems
    if trial["ok"] and not opts.keep:
        _remove(save, log)
    return trial


def _remove(save: str, log: str) -> None:
    shutil.rmtree(save, ignore_errors=True)
    if os.path.exists(log):
        os.remove(log)


def layout_list(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LAYOUTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: layouts are {', '.join(LAYOUTS)} (comma-separated)")
    return names


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="benchmarks/chaos.py", description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="a .bin/.idx prefix")
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument(
        "--layouts",
        type=layout_list,
        default=list(LAYOUTS),
        help=f"comma list of the layouts to draw from ({', '.join(LAYOUTS)}; default all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--keep", action="store_true", help="keep the folders of trials that pass")
    parser.add_argument(
        "--bad-inputs",
        action="store_true",
        help="also run the bad-input matrix (benchmarks/bad_inputs.py) against the tp1 reference run",
    )
    parser.add_argument(
        "--bad-inputs-subprocess",
        action="store_true",
        help="run each bad-input case in a process of its own (as a user does; slower)",
    )
    parser.add_argument(
        "--async-save",
        action="store_true",
        help="the trials (not the reference runs) write their interval saves in the background, so "
        "signals also land while a background save is in flight",
    )
    parser.add_argument("--output-json", default=None)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_main(lambda: _chaos(argv))


def _chaos(argv: List[str]) -> int:
    opts = build_parser().parse_args(argv)
    if opts.trials < 0:
        raise ArgumentError(f"--trials {opts.trials} must be >= 0")
    if opts.bad_inputs and "tp1" not in opts.layouts:
        raise ArgumentError("--bad-inputs runs against the tp1 reference: include tp1 in --layouts")
    for path in (opts.data_path + ".bin", opts.data_path + ".idx", opts.tokenizer_model):
        if not os.path.isfile(path):
            raise ArgumentError(f"{path}: no such file")
    os.makedirs(opts.work_dir, exist_ok=True)
    rng = random.Random(opts.seed)
    references = {layout: reference_run(opts, layout) for layout in opts.layouts}
    trials = []
    print("trial  layout  signal   target    after it + s  killed@it  exit  saved@it  resume exits  result")
    for index in range(opts.trials):
        trial = run_trial(opts, index, rng, references)
        trials.append(trial)
        print(
            f"{index:5d}  {trial['layout']:6s}  {trial['signal']:7s}  {trial['target']:8s}  "
            f"{trial['after_iteration']:5d} + {trial['extra_s']:4.1f}  "
            f"{trial['killed_at_iteration']:9d}  {trial['exit']:4d}  {str(trial['saved_at']):>8s}  "
            f"{str(trial['resume_exits']):12s}  {'ok' if trial['ok'] else '; '.join(trial['problems'])}"
            f"{' (' + trial['note'] + ')' if 'note' in trial else ''}",
            flush=True,
        )
    failed = [t for t in trials if not t["ok"]]
    sigterms = [t for t in trials if t["signal"] == "SIGTERM" and "note" not in t]
    print(
        f"{len(trials) - len(failed)}/{len(trials)} trials resumed to the reference's losses, grad norms, LRs "
        f"and final checkpoint; SIGTERM: {sum(bool(t.get('workers_saved')) for t in sigterms)}/{len(sigterms)} "
        f"saved on every rank at the stop step"
    )
    matrix = []
    if opts.bad_inputs:
        from benchmarks.bad_inputs import run_matrix

        reference = references["tp1"]["save"]
        work = os.path.join(opts.work_dir, "bad-inputs")
        final = checkpoint_dir(reference, ITERS)
        matrix = run_matrix(work, opts.data_path, opts.tokenizer_model, reference, final, opts.bad_inputs_subprocess)
    failed += [case for case in matrix if not case["ok"]]
    if opts.output_json:
        write_json(
            opts.output_json,
            {
                "command": command_line("chaos.py", argv),
                "environment": environment(True),
                "iterations": ITERS,
                "save_interval": SAVE_INTERVAL,
                "async_save": opts.async_save,
                "references": {
                    layout: {k: v for k, v in r.items() if k != "records"} for layout, r in references.items()
                },
                "trials": trials,
                "bad_inputs": matrix,
            },
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
