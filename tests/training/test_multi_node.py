"""Multi-node launch on one machine: examples/train_multi_node.sbatch, run for real under bash,
starts two torchrun agents (two 'nodes', c10d rendezvous on 127.0.0.1) of two processes each:
the tiny preset over gloo, tensor parallelism inside a node and data parallelism across the two.
Its losses and gradient norms must equal, bit for bit, those of the same script at one node of
four processes (the same layout, TP=2 x DP=2, in one agent).

Only SLURM itself is replaced: ``srun`` by a stand-in that starts its command once per node
(SLURM_NNODES times, in the background) and ``scontrol`` by one that names 127.0.0.1 as the
first node. Everything else (torchrun's flags, the trainer flags of examples/train_args.sh, the
rendezvous) is what a cluster runs; the CPU flags are appended as trainer flags after the
script name, as a user would override them."""

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
echo "$*" >> "$SCONTROL_LOG"
echo 127.0.0.1
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


def run_sbatch(tmp_path, name, corpus, nodes, gpus_per_node, srun=SRUN):
    """Run the SLURM script as sbatch would on ``nodes`` nodes; returns (exit code, node logs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool, body in (("srun", srun), ("scontrol", SCONTROL)):
        (bin_dir / tool).write_text(body)
        (bin_dir / tool).chmod((bin_dir / tool).stat().st_mode | stat.S_IXUSR)
    env = dict(
        os.environ,
        **SIZES,
        PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        DATA=corpus["prefix"],
        TOKENIZER=corpus["tokenizer"],
        SAVE=str(tmp_path / name),
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NODELIST="node[001-002]",
        SLURM_JOB_ID=f"{name}-{os.getpid()}",
        GPUS_PER_NODE=str(gpus_per_node),
        MASTER_PORT=str(free_port()),
        NODE_LOG_PREFIX=str(tmp_path / f"{name}-node"),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        OMP_NUM_THREADS="1",
        TORCHDYNAMO_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    done = subprocess.run(
        ["bash", "examples/train_multi_node.sbatch", *CPU_FLAGS],
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


# stand-in for srun that runs no trainer: the step ends with status $STEP_STATUS, having saved
# iteration $STEP_SAVES (none when empty), as a pre-empted run (torchrun exits 1 after a signal even
# when its workers saved and exited 0) or a crash would
SRUN_OUTCOME = """#!/usr/bin/env bash
# scancel --signal=TERM --full reaches the batch shell too (its parent here)
if [[ -n ${STEP_STOPPED_BY_HAND:-} ]]; then kill -TERM "$PPID"; sleep 0.2; fi
if [[ -n $STEP_SAVES ]]; then echo "$STEP_SAVES" > "$SAVE/latest_checkpointed_iteration.txt"; fi
exit "$STEP_STATUS"
"""


@pytest.mark.parametrize(
    "saved_before, step_saves, step_status, requeued, job_status",
    [
        ("", "40", 1, True, 0),  # pre-empted at the time limit after its save: requeued to go on
        ("40", "80", 1, True, 0),  # the next window, likewise
        ("40", "", 1, False, 1),  # failed before saving anything new: ends, with the failure
        ("40", "80", 0, False, 0),  # finished
        ("", "", 2, False, 2),  # refused its flags
    ],
)
def test_a_step_that_saved_then_stopped_requeues_the_job(
    tiny_corpus, tmp_path, monkeypatch, saved_before, step_saves, step_status, requeued, job_status
):
    save = tmp_path / "run"
    save.mkdir()
    if saved_before:
        (save / "latest_checkpointed_iteration.txt").write_text(saved_before + "\n")
    monkeypatch.setenv("STEP_SAVES", step_saves)
    monkeypatch.setenv("STEP_STATUS", str(step_status))
    code, output = run_sbatch(tmp_path, "run", tiny_corpus, nodes=2, gpus_per_node=2, srun=SRUN_OUTCOME)
    assert code == job_status, output
    asked = (tmp_path / "scontrol.log").read_text().splitlines()
    assert asked[0] == "show hostnames node[001-002]"
    assert asked[1:] == ([f"requeue run-{os.getpid()}"] if requeued else []), asked
    if requeued:
        assert f"after saving iteration {step_saves} in {save}: requeueing job run-{os.getpid()}" in output, output


def test_a_stop_by_hand_that_saved_ends_the_job_without_requeueing_it(tiny_corpus, tmp_path, monkeypatch):
    """scancel --signal=TERM --full: the workers save and torchrun exits 1, as at the time limit, but
    the batch shell was signalled too: the job ends (status 0) instead of being requeued."""
    monkeypatch.setenv("STEP_SAVES", "40")
    monkeypatch.setenv("STEP_STATUS", "1")
    monkeypatch.setenv("STEP_STOPPED_BY_HAND", "1")
    code, output = run_sbatch(tmp_path, "run", tiny_corpus, nodes=2, gpus_per_node=2, srun=SRUN_OUTCOME)
    assert code == 0 and "requeue" not in (tmp_path / "scontrol.log").read_text(), output
    assert f"stopped by hand after saving iteration 40 in {tmp_path / 'run'}: submit the script again" in output


def test_requeue_can_be_turned_off(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("STEP_SAVES", "40")
    monkeypatch.setenv("STEP_STATUS", "1")
    monkeypatch.setenv("REQUEUE", "0")
    code, output = run_sbatch(tmp_path, "run", tiny_corpus, nodes=2, gpus_per_node=2, srun=SRUN_OUTCOME)
    assert code == 1 and "requeue" not in (tmp_path / "scontrol.log").read_text(), output
