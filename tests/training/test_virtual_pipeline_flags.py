"""The virtual-pipeline flags (megatron's names) of the trainer and the checkpoint tools: what they
resolve to, and the one-line errors for layouts the interleaved schedule cannot run. No process
group and no tokenizer: the flags are checked before either is needed."""

import pytest

from benchmarks.common import tiny_run_flags
from megatron_patch.architecture.presets import get_preset
from megatron_patch.checkpoint.info import CheckpointInfo, check_layout
from megatron_patch.errors import ArgumentError
from megatron_patch.training import cli
from megatron_patch.training.arguments import make_config
from megatron_patch.training.flags import build_parser

# the tiny run (the tiny preset: 4 layers) in micro-batches of 2; the data is never read
BASE = [*tiny_run_flags("unused", "unused.model", train_iters=6), "--micro-batch-size", "2"]


def config(*flags, world_size=2):
    return make_config(build_parser().parse_args(BASE + list(flags)), world_size, tokenizer_vocab_size=512)


@pytest.mark.parametrize(
    "flags, virtual",
    [
        (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"], 2),
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], 2),
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"], None),
        (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "1"], None),
        (["--virtual-pipeline-model-parallel-size", "1"], None),
        (["--pipeline-model-parallel-size", "2"], None),
    ],
    ids=["V=2", "N=1", "N=L/PP", "V=1", "V=1,PP=1", "none"],
)
def test_flags_resolve_to_the_virtual_stages_per_rank(flags, virtual):
    trainer = config(*flags)
    assert trainer.model.virtual_pipeline_parallel == virtual
    assert trainer.flags["virtual_pipeline_model_parallel_size"] == virtual  # recorded in checkpoints
    assert trainer.model.transformer_config(cpu=True).virtual_pipeline_model_parallel_size == virtual


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--virtual-pipeline-model-parallel-size", "2"],
            "--virtual-pipeline-model-parallel-size 2 needs --pipeline-model-parallel-size > 1",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "3"],
            "--pipeline-model-parallel-size 2 x 3 virtual stages does not divide the 4 layers of --model tiny: "
            "use one of 2",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
            "--num-layers-per-virtual-pipeline-stage 3 does not divide the 2 layers of each of the "
            "--pipeline-model-parallel-size 2 stages of --model tiny: use one of 1, 2",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "0"],
            "--virtual-pipeline-model-parallel-size 0 must be >= 1",
        ),
        (
            [
                "--pipeline-model-parallel-size",
                "2",
                "--virtual-pipeline-model-parallel-size",
                "2",
                "--num-layers-per-virtual-pipeline-stage",
                "1",
            ],
            "not allowed with argument",
        ),
        (
            # patch stage: 16/4 = 4 samples in micro-batches of 4 -> 1 micro-batch per step
            ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"]
            + ["--micro-batch-size", "4"],
            "--virtual-pipeline-model-parallel-size 2: the patch stage has 1 micro-batches per step, not a "
            "multiple of --pipeline-model-parallel-size 2 (interleaved schedule): make --global-batch-size 16 a "
            "multiple of K x micro-batch x data-parallel x PP = 4 x 4 x 1 x 2 = 32, or lower --micro-batch-size",
        ),
        (
            # token-only: 10 samples in micro-batches of 2 -> 5 per step
            ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
            + ["--patch-size", "1", "--global-batch-size", "10"],
            "--num-layers-per-virtual-pipeline-stage 1 (V=2): the token stage has 5 micro-batches per step, not "
            "a multiple of --pipeline-model-parallel-size 2 (interleaved schedule): make --global-batch-size 10 "
            "a multiple of micro-batch x data-parallel x PP = 2 x 1 x 2 = 4",
        ),
    ],
    ids=["needs-pp", "pp-x-v-layers", "layers-per-stage", "zero", "both-flags", "patch-microbatches", "token"],
)
def test_layouts_the_interleaved_schedule_cannot_run_are_refused(flags, message):
    with pytest.raises(ArgumentError) as error:
        config(*flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_trainer_says_it_in_one_line_and_exits_2(capsys):
    code = cli.main(BASE + ["--virtual-pipeline-model-parallel-size", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "needs --pipeline-model-parallel-size > 1" in err[0], err


def test_the_tools_check_the_flags_against_the_checkpoint():
    preset = get_preset("tiny")
    info = CheckpointInfo("ckpt/iter_0000006", {}, preset, 32, 512, False)
    assert check_layout(info, 1, 2, virtual_size=2) == 2
    assert check_layout(info, 1, 2, layers_per_virtual_stage=1) == 2
    assert check_layout(info, 1, 2) is None
    with pytest.raises(ArgumentError, match="does not divide the 4 layers of checkpoint ckpt/iter_0000006"):
        check_layout(info, 1, 2, virtual_size=4)
    with pytest.raises(ArgumentError, match="needs --pipeline-model-parallel-size > 1"):
        check_layout(info, 1, 1, virtual_size=2)
