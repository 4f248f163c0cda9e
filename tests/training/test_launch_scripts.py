"""The launch scripts in examples/ start a command that passes the trainer's validation, for every
preset they list, at the world size they start: 8 GPUs on one node (torchrun) and 8 nodes of 8
(SLURM: one torchrun agent per node). The scripts run for real under bash with stand-ins for
torchrun, srun and scontrol on PATH that record the command line instead of starting anything.
tests/training/test_multi_node.py runs the SLURM script's command for real, on one machine."""

import os
import re
import stat
import subprocess
from types import SimpleNamespace

import pytest

from megatron_patch.training.arguments import parse_args
from tests.training.common import REPO_ROOT

PRESETS = ("370m", "780m", "1.3b", "2.7b", "6.7b", "13b")
LAYOUT_LINE = re.compile(r"([\w.]+)\)\s+TP=\$\{TP:-(\d+)\} PP=\$\{PP:-(\d+)\} MBS=\$\{MBS:-(\d+)\}")
RECORDER = '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$LAUNCH_RECORD"\n'
# srun's also records the CPUs per task it would give the step
SRUN_RECORDER = RECORDER + 'printf "%s" "${SRUN_CPUS_PER_TASK:-unset}" > "$LAUNCH_RECORD.cpus"\n'
SCRIPTS = {  # script: (world size, the environment its launcher would give it)
    "train_single_node.sh": (8, {"GPUS": "8"}),
    "train_multi_node.sbatch": (64, {"SLURM_NNODES": "8", "SLURM_JOB_NODELIST": "node[001-008]"}),
}


def _stand_ins(folder):
    for name, body in (
        ("torchrun", RECORDER),
        ("srun", SRUN_RECORDER),
        ("scontrol", "#!/usr/bin/env bash\necho node001\n"),
    ):
        path = folder / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _inherited() -> dict:
    """This process's environment less what the scripts read (so that a SLURM job or a shell with
    GBS set, say, does not change what the tests expect)."""
    read = ("TP", "PP", "MBS", "GBS", "GPUS", "GPUS_PER_NODE", "SEQ_LENGTH", "TRAIN_TOKENS")
    read += ("MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
    return {k: v for k, v in os.environ.items() if k not in read and not k.startswith(("SLURM_", "SRUN_"))}


def _run_script(script, model, tmp_path, environment, tokenizer, *extra, cwd=REPO_ROOT):
    """The script run under bash with the stand-ins, from ``cwd``: (the finished process, its record file)."""
    bin_dir, record = tmp_path / "bin", tmp_path / f"{model}.argv"
    bin_dir.mkdir(exist_ok=True)
    _stand_ins(bin_dir)
    # what the scripts read from the environment comes from the test alone (not from a SLURM job it runs in)
    env = {
        **_inherited(),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "LAUNCH_RECORD": str(record),
        "MODEL": model,
        "DATA": "data/train_text_document",
        "TOKENIZER": str(tokenizer),
        "SAVE": str(tmp_path / model),
        **environment,
    }
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "examples" / script), *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, record


def _launched_argv(script, model, tmp_path, environment, tokenizer, *extra):
    """The whole command line the script starts (torchrun's, or srun's with torchrun in it)."""
    done, record = _run_script(script, model, tmp_path, environment, tokenizer, *extra)
    assert done.returncode == 0, done.stderr
    return record.read_text().split("\0")[:-1]


def _trainer_at(words) -> int:
    """Where the trainer script is in a launched command line (named from the repository root, or by
    its absolute path)."""
    return next(i for i, word in enumerate(words) if word.endswith("examples/pretrain_patch_gpt.py"))


def _launched_trainer_argv(script, model, tmp_path, environment, tokenizer, *extra):
    words = _launched_argv(script, model, tmp_path, environment, tokenizer, *extra)
    return words[_trainer_at(words) + 1 :]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_listed_preset_launches_a_valid_trainer_command(script, tmp_path, tiny_corpus):
    world_size, environment = SCRIPTS[script]
    layouts = {
        model: (int(tp), int(pp), int(mbs))
        for model, tp, pp, mbs in LAYOUT_LINE.findall((REPO_ROOT / "examples" / script).read_text())
    }
    assert sorted(layouts) == sorted(PRESETS)
    for model in PRESETS:
        args = SimpleNamespace(
            **parse_args(
                _launched_trainer_argv(script, model, tmp_path, environment, tiny_corpus["tokenizer"]),
                world_size=world_size,
            ).flags
        )
        tp, pp, mbs = layouts[model]
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp), model
        assert 1 <= args.micro_batch_size <= mbs, model  # the SLURM script may lower it for many ranks
        assert args.bf16 and args.use_distributed_optimizer, model
        assert args.overlap_grad_reduce and args.overlap_param_gather, model
        assert args.sequence_parallel == (tp > 1), model  # with TP, SP (the memory plans assume it)
        assert args.global_batch_size * args.seq_length == 1024 * 2048, model  # 2M tokens per step, as the paper


def test_the_slurm_script_lowers_the_micro_batch_to_what_the_patch_stage_gives_each_rank(tmp_path, tiny_corpus):
    """370m at 64 ranks: the patch stage has 1024/4 = 256 sequences per step, 4 per rank, so the
    preset's micro-batch of 16 becomes 4; at 8 ranks (32 per rank) it stays 16."""
    world_size, environment = SCRIPTS["train_multi_node.sbatch"]
    argv = _launched_trainer_argv("train_multi_node.sbatch", "370m", tmp_path, environment, tiny_corpus["tokenizer"])
    assert argv[argv.index("--micro-batch-size") + 1] == "4"
    argv = _launched_trainer_argv(
        "train_multi_node.sbatch", "370m", tmp_path, dict(environment, SLURM_NNODES="1"), tiny_corpus["tokenizer"]
    )
    assert argv[argv.index("--micro-batch-size") + 1] == "16"
    env = dict(_inherited(), MODEL="370m", DATA="d", TOKENIZER="t", SAVE=str(tmp_path / "x"), **environment)
    env["SLURM_NNODES"] = "256"  # 256 patch-stage sequences cannot feed 2048 ranks (8 per node)
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "examples" / "train_multi_node.sbatch")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "2048 GPUs leave no patch-stage sequence per data-parallel rank at GBS=1024, K=4: use fewer nodes"
    )


def test_one_torchrun_agent_per_node_meets_at_a_c10d_rendezvous_on_the_first_node(tmp_path):
    words = _launched_argv(
        "train_multi_node.sbatch", "2.7b", tmp_path, SCRIPTS["train_multi_node.sbatch"][1], "spm.model"
    )
    launcher = words[: _trainer_at(words)]
    assert launcher[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]  # srun's options
    assert launcher[2:] == [
        "torchrun",
        "--nnodes=8",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node001:29500",
        "--rdzv-id=patch-gpt",
    ]


def test_both_scripts_pass_the_same_trainer_flags_and_append_the_user_s(tmp_path):
    """One node of 8 GPUs either way: the same layout, so the same flags (examples/train_args.sh);
    flags after the script name come last, so argparse takes them."""
    extra = ("--seq-length", "4096", "--lr", "1e-4")
    single = _launched_trainer_argv("train_single_node.sh", "1.3b", tmp_path, {"GPUS": "8"}, "spm.model", *extra)
    multi = _launched_trainer_argv(
        "train_multi_node.sbatch",
        "1.3b",
        tmp_path,
        dict(SCRIPTS["train_multi_node.sbatch"][1], SLURM_NNODES="1"),
        "spm.model",
        *extra,
    )
    assert single == multi
    assert single[-4:] == list(extra)
    assert single[single.index("--micro-batch-size") + 1] == "8"


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_a_layout_in_the_environment_wins_over_the_preset_s(tmp_path):
    for script in sorted(SCRIPTS):
        environment = dict(SCRIPTS[script][1], TP="2", MBS="2")
        argv = _launched_trainer_argv(script, "2.7b", tmp_path, environment, "spm.model")
        assert (_flag(argv, "--tensor-model-parallel-size"), _flag(argv, "--micro-batch-size")) == ("2", "2"), script


@pytest.mark.parametrize(
    "environment, extra, micro_batch",
    [
        ({"MODEL": "2.7b", "GBS": "1536"}, (), "3"),  # 6 patch sequences per rank: 4 does not divide them
        ({"MODEL": "370m"}, ("--global-batch-size", "512"), "2"),  # a trailing flag counts: 512/4/64
        ({"MODEL": "370m"}, ("--patch-size=8",), "2"),  # 1024/8/64, in the --flag=value form too
        ({"MODEL": "370m"}, ("--tensor-model-parallel-size", "2"), "8"),  # DP 32: 1024/4/32
    ],
)
def test_the_slurm_script_s_micro_batch_divides_each_rank_s_patch_sequences(
    tmp_path, tiny_corpus, environment, extra, micro_batch
):
    """The micro-batch is the largest up to the preset's that divides GBS/K/DP, with GBS, K, TP and
    PP as the trainer will see them (the environment, or flags after the script name, which win),
    so the trainer accepts the command at 8 nodes of 8 GPUs."""
    world_size, slurm = SCRIPTS["train_multi_node.sbatch"]
    model = environment.pop("MODEL")
    argv = _launched_trainer_argv(
        "train_multi_node.sbatch", model, tmp_path, dict(slurm, **environment), tiny_corpus["tokenizer"], *extra
    )
    assert _flag(argv, "--micro-batch-size") == micro_batch
    parse_args(argv, world_size=world_size)  # accepted


def test_the_slurm_script_takes_its_gpus_and_cpus_from_slurm_and_refuses_a_bad_number(tmp_path):
    slurm = dict(SCRIPTS["train_multi_node.sbatch"][1], SLURM_GPUS_PER_NODE="h100:4", SLURM_CPUS_ON_NODE="96")
    words = _launched_argv("train_multi_node.sbatch", "2.7b", tmp_path, slurm, "spm.model")
    assert "--nproc-per-node=4" in words
    # every CPU of the node to the one task (srun of Slurm >= 22.05 would give it one)
    assert (tmp_path / "2.7b.argv.cpus").read_text() == "96"
    done, _ = _run_script("train_multi_node.sbatch", "2.7b", tmp_path, dict(slurm, GBS="1024 "), "spm.model")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == "GBS=1024  must be a positive whole number"
    done, _ = _run_script("train_multi_node.sbatch", "2.7b", tmp_path, dict(slurm, TP="3"), "spm.model")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        "TP=3 x PP=1 does not divide the 32 GPUs of 8 nodes of 4"
    )


def test_the_single_node_script_starts_one_worker_per_visible_gpu(tmp_path):
    words = _launched_argv("train_single_node.sh", "370m", tmp_path, {"CUDA_VISIBLE_DEVICES": "2,3,5"}, "spm.model")
    assert "--nproc_per_node=3" in words
    words = _launched_argv("train_single_node.sh", "370m", tmp_path, {}, "spm.model")
    assert "--nproc_per_node=8" in words


def test_the_single_node_script_runs_from_any_folder_with_paths_relative_to_it(tmp_path):
    """Started from another folder, the script finds its flags and the trainer beside it, and DATA,
    SAVE and the trainer flags' paths stay relative to the caller's folder."""
    caller = tmp_path / "caller"
    caller.mkdir()
    environment = {"GPUS": "2", "SAVE": "ckpt/run"}  # and DATA=data/train_text_document
    done, record = _run_script(
        "train_single_node.sh", "370m", tmp_path, environment, "spm.model", "--tensorboard-dir", "tb", cwd=caller
    )
    assert done.returncode == 0, done.stderr
    words = record.read_text().split("\0")[:-1]
    trainer = words[_trainer_at(words)]
    assert trainer == str(REPO_ROOT / "examples" / "pretrain_patch_gpt.py")
    argv = words[_trainer_at(words) + 1 :]
    assert (_flag(argv, "--data-path"), _flag(argv, "--save"), argv[-1]) == (
        "data/train_text_document",
        "ckpt/run",
        "tb",
    )
    assert (caller / "ckpt" / "run").is_dir()  # made where the caller is


@pytest.mark.parametrize(
    "environment, message",
    [
        ({"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES is set but empty, so no GPU is visible"),
        ({"GPUS": "0"}, "GPUS=0 must be a positive whole number"),
    ],
)
def test_the_single_node_script_refuses_no_gpus_in_one_line(tmp_path, environment, message):
    done, record = _run_script("train_single_node.sh", "370m", tmp_path, environment, "spm.model")
    assert done.returncode == 2 and not record.exists()
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(message)
