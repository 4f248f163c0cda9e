"""Multi-node launch on one machine: examples/train_multi_node.sbatch, run for real under bash,
starts two torchrun agents (two 'nodes', c10d rendezvous on 127.0.0.1) of two processes each:
the tiny preset over gloo, tensor parallelism inside a node and data parallelism across the two.
Its losses and gradient norms must equal, bit for bit, those of the same script at one node of
four processes (the same layout, TP=2 x DP=2, in one agent).

Only SLURM itself is replaced: ``srun`` by a stand-in that starts its command once per node
(SLURM_NNODES times, in the background) and ``scontrol`` by one that names 127.0.0.1 as the
first node. Everything else (torchrun's flags, the trainer flags of examples/train_args.sh, the
rendezvous) is what a cluster runs; the CPU flags are appended as trainer flags after the
script name, as a user would override them.

The requeue tests run the script with a stand-in step instead (no trainer, no torchrun): what it
saves, how it ends and which signals reach the batch shell decide whether the job is requeued."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from tests.training.common import REPO_ROOT, train_records

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)

SRUN = """#!/usr/bin/env bash
# stand-in for srun: skip its options, start the command once per node, fail if any node fails
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
pids=()
for (( node = 0; node < SLURM_NNODES; node++ )); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" > "$NODE_LOG_PREFIX$node.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
# stand-in for scontrol: the first node is this machine; what it is asked is recorded
echo "scontrol $*" >> "$SLURM_LOG"
echo 127.0.0.1
"""
# stand-in for scancel: recorded; a signal for the job (neither --batch nor --full) reaches the tasks
# of its steps, not the batch shell, as slurmstepd delivers it: here the stand-in step's one task
SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$SLURM_LOG"
signal=KILL
for arg; do case $arg in --signal=*) signal=${arg#--signal=} ;; --batch|-b|--full|-f) exit 1 ;; esac; done
kill -s "$signal" "$(cat "$STEP_TASK_PID")"
"""
# stand-in for torchrun in the runs of a stand-in step: only its --help is read, for the flags it knows
TORCHRUN_HELP = """#!/usr/bin/env bash
echo "--shutdown-timeout SHUTDOWN_TIMEOUT --signals-to-handle SIGNALS_TO_HANDLE"
"""
# 3 steps of 16 x 32 tokens: 2 patch steps (4 sequences of 4 x 32 tokens), 1 token step
SIZES = {
    "MODEL": "tiny",
    "TP": "2",
    "PP": "1",
    "MBS": "2",
    "GBS": "16",
    "SEQ_LENGTH": "32",
    "TRAIN_TOKENS": str(3 * 16 * 32),
}
CPU_FLAGS = [
    "--cpu",
    "--lr-warmup-iters",
    "1",
    "--eval-iters",
    "0",
    "--num-workers",
    "0",
    "--log-interval",
    "1",
    "--split",
    "97,3,0",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_sbatch(tmp_path, name, corpus, nodes, gpus_per_node, srun=SRUN, extra=()):
    """Run the SLURM script as sbatch would on ``nodes`` nodes, with ``extra`` after the CPU flags;
    returns (exit code, node logs). With a stand-in ``srun`` (no trainer) torchrun is one too and
    ``corpus`` may be None."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tools = {"srun": srun, "scontrol": SCONTROL, "scancel": SCANCEL}
    if srun != SRUN:
        tools["torchrun"] = TORCHRUN_HELP
    for tool, body in tools.items():
        (bin_dir / tool).write_text(body)
        (bin_dir / tool).chmod((bin_dir / tool).stat().st_mode | stat.S_IXUSR)
    env = dict(
        os.environ,
        **SIZES,
        PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        DATA=corpus["prefix"] if corpus else "data/unused",
        TOKENIZER=corpus["tokenizer"] if corpus else "unused.model",
        SAVE=str(tmp_path / name),
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NODELIST="node[001-002]",
        SLURM_JOB_ID=f"{name}-{os.getpid()}",
        GPUS_PER_NODE=str(gpus_per_node),
        MASTER_PORT=str(free_port()),
        NODE_LOG_PREFIX=str(tmp_path / f"{name}-node"),
        SLURM_LOG=str(tmp_path / "slurm.log"),
        STEP_TASK_PID=str(tmp_path / "step-task.pid"),
        OMP_NUM_THREADS="1",
        TORCHDYNAMO_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    done = subprocess.run(
        ["bash", "examples/train_multi_node.sbatch", *CPU_FLAGS, *extra],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = "".join(
        log.read_text() for log in (tmp_path / f"{name}-node{node}.log" for node in range(nodes)) if log.exists()
    )
    return done.returncode, done.stderr + logs


def final_layout(save) -> dict:
    """The parallel layout recorded in the run's last checkpoint."""
    with open(save / "latest_checkpointed_iteration.txt") as tracker:
        iteration = int(tracker.read())
    with open(save / f"iter_{iteration:07d}" / "megatron_patch.json") as metadata:
        return json.load(metadata)["layout"]


def test_two_torchrun_agents_give_the_losses_of_one(tiny_corpus, tmp_path):
    # one agent cannot finish alone: the rendezvous waits for --nnodes=2 agents
    code, output = run_sbatch(tmp_path, "two-nodes", tiny_corpus, nodes=2, gpus_per_node=2)
    assert code == 0, output[-4000:]
    code, single_output = run_sbatch(tmp_path, "one-node", tiny_corpus, nodes=1, gpus_per_node=4)
    assert code == 0, single_output[-4000:]

    for name in ("two-nodes", "one-node"):
        assert final_layout(tmp_path / name) == {"pipeline": 1, "tensor": 2, "data": 2}, name
    two, one = train_records(tmp_path / "two-nodes"), train_records(tmp_path / "one-node")
    assert sorted(two) == sorted(one) == [1, 2, 3]
    assert [two[i]["stage"] for i in (1, 2, 3)] == ["patch", "patch", "token"]
    for iteration in two:  # bit for bit: the same ranks do the same arithmetic over gloo
        assert two[iteration]["loss"] == one[iteration]["loss"], iteration
        assert two[iteration]["grad_norm"] == one[iteration]["grad_norm"], iteration


# stand-in for srun that runs no trainer: its one task saves iteration $STEP_SAVES (none when empty)
# into the trainer's --save folder (the last --save of its command line, as argparse takes it) and
# the step ends with status $STEP_STATUS, as a pre-empted run (torchrun exits 1 after a signal even
# when its workers saved and exited 0) or a crash would. STEP_CUT_SHORT: that save stays an
# iter_N.tmp (killed before its rename). STEP_REPAIRS: the tracker is rewritten to name that
# iteration, nothing saved (a resume repairing a tracker that lagged behind a complete checkpoint).
# STEP_STOP=slurm: SLURM's own SIGTERM reaches the batch shell too (the time limit, a pre-emption's
# GraceTime); STEP_STOP=hand: the batch shell gets SIGUSR2 (scancel --signal=USR2 --batch) and the
# task saves once a SIGTERM reaches it (5 s at most; else it ends with status 3, unsaved). As srun
# does, a SIGTERM to srun itself kills the task unsaved.
SRUN_OUTCOME = """#!/usr/bin/env bash
args=("$@")
for (( i = 0; i < ${#args[@]}; i++ )); do
  case ${args[i]} in --save) save=${args[i+1]} ;; --save=*) save=${args[i]#--save=} ;; esac
done
shell=$PPID
task() {
  echo "$BASHPID" > "$STEP_TASK_PID"
  stopped=0
  trap 'stopped=1' TERM
  case ${STEP_STOP:-} in
    slurm) kill -TERM "$shell"; sleep 0.2 ;;
    hand)
      kill -USR2 "$shell"
      for (( tries = 0; tries < 100 && !stopped; tries++ )); do sleep 0.05; done
      if (( !stopped )); then exit 3; fi ;;
  esac
  if [[ -n ${STEP_SAVES:-} ]]; then
    folder=$save/iter_$(printf %07d "$STEP_SAVES")${STEP_CUT_SHORT:+.tmp}
    mkdir -p "$folder" && echo {} > "$folder/megatron_patch.json"
    if [[ -z ${STEP_CUT_SHORT:-} ]]; then echo "$STEP_SAVES" > "$save/latest_checkpointed_iteration.txt"; fi
  fi
  if [[ -n ${STEP_REPAIRS:-} ]]; then echo "$STEP_REPAIRS" > "$save/latest_checkpointed_iteration.txt"; fi
  exit "$STEP_STATUS"
}
task &
task=$!
trap 'echo "srun: forcing job termination" >&2; kill -KILL "$task"; exit 137' TERM
wait "$task"
"""


def saved(save, *iterations, tracker=None):
    """Complete checkpoints of ``iterations`` in ``save``; the tracker names ``tracker`` (default: the newest)."""
    for iteration in iterations:
        (save / f"iter_{iteration:07d}").mkdir(parents=True)
        (save / f"iter_{iteration:07d}" / "megatron_patch.json").write_text("{}")
    if iterations:
        (save / "latest_checkpointed_iteration.txt").write_text(f"{tracker or max(iterations)}\n")


def run_step(tmp_path, monkeypatch, extra=(), **step):
    """The script run with the stand-in step, as job run-PID (SAVE=tmp_path/run): (exit code, output,
    what was asked of SLURM after the node list)."""
    for variable in ("STEP_SAVES", "STEP_STATUS", "STEP_STOP", "STEP_CUT_SHORT", "STEP_REPAIRS", "REQUEUE"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in step.items():
        monkeypatch.setenv(variable, str(value))
    code, output = run_sbatch(tmp_path, "run", None, nodes=2, gpus_per_node=2, srun=SRUN_OUTCOME, extra=extra)
    asked = (tmp_path / "slurm.log").read_text().splitlines()
    assert asked[0] == "scontrol show hostnames node[001-002]", asked
    return code, output, asked[1:]


JOB = f"run-{os.getpid()}"


@pytest.mark.parametrize(
    "before, step, requeued, job_status",
    [
        ((), {"STEP_SAVES": 40, "STEP_STATUS": 1}, 40, 0),  # pre-empted at the time limit after its save: requeued
        ((40,), {"STEP_SAVES": 80, "STEP_STATUS": 1}, 80, 0),  # the next window, likewise
        ((40,), {"STEP_STATUS": 1}, None, 1),  # failed before saving anything new: ends, with the failure
        ((40,), {"STEP_SAVES": 80, "STEP_STATUS": 0}, None, 0),  # finished
        ((), {"STEP_STATUS": 2}, None, 2),  # refused its flags
        ((40,), {"STEP_SAVES": 80, "STEP_CUT_SHORT": 1, "STEP_STATUS": 1}, None, 1),  # its save was cut short
        # the tracker lagged behind iter_80 (a kill before its write); the resume repaired it and then
        # failed before a save: nothing new, not requeued
        ((40, 80), {"STEP_REPAIRS": 80, "STEP_STATUS": 1}, None, 1),
        # SLURM's own SIGTERM reached the batch shell too (the time limit, a pre-emption with GraceTime):
        # not a stop by hand, so the save is resumed from
        ((40,), {"STEP_SAVES": 80, "STEP_STATUS": 1, "STEP_STOP": "slurm"}, 80, 0),
    ],
)
def test_a_step_that_saved_then_stopped_requeues_the_job(tmp_path, monkeypatch, before, step, requeued, job_status):
    save = tmp_path / "run"
    saved(save, *before, tracker=before[0] if before else None)  # (40, 80): the tracker lags
    code, output, asked = run_step(tmp_path, monkeypatch, **step)
    assert code == job_status, output
    assert asked == ([f"scontrol requeue {JOB}"] if requeued else []), asked
    if requeued:
        assert f"after saving iteration {requeued} in {save}: requeueing job {JOB}" in output, output


def test_a_stop_by_hand_that_saved_ends_the_job_without_requeueing_it(tmp_path, monkeypatch):
    """scancel --signal=USR2 --batch: the script sends the step SIGTERM through scancel (not through
    srun, which would kill its tasks), the workers save and torchrun exits 1, as at the time limit,
    but the job ends (status 0) instead of being requeued."""
    saved(tmp_path / "run", 40)
    code, output, asked = run_step(tmp_path, monkeypatch, STEP_SAVES=80, STEP_STATUS=1, STEP_STOP="hand")
    assert code == 0, output
    assert asked == [f"scancel --signal=TERM {JOB}"], asked
    assert f"stopped by hand after saving iteration 80 in {tmp_path / 'run'}: submit the script again" in output


@pytest.mark.parametrize("flags", [("--save", "{other}"), ("--save", "{run}", "--save={other}")])
def test_a_save_folder_given_after_the_script_name_is_the_one_watched(tmp_path, monkeypatch, flags):
    """A --save after the script name overrides train_args.sh's (the last one wins, as in argparse):
    its checkpoints decide the requeue, not SAVE's."""
    other = tmp_path / "other"
    saved(other, 40)
    extra = [flag.format(other=other, run=tmp_path / "run") for flag in flags]
    code, output, asked = run_step(tmp_path, monkeypatch, extra, STEP_SAVES=80, STEP_STATUS=1)
    assert code == 0 and asked == [f"scontrol requeue {JOB}"], output
    assert f"after saving iteration 80 in {other}: requeueing job {JOB}" in output, output


def test_requeue_can_be_turned_off(tmp_path, monkeypatch):
    code, output, asked = run_step(tmp_path, monkeypatch, STEP_SAVES=40, STEP_STATUS=1, REQUEUE=0)
    assert code == 1 and asked == [], output
