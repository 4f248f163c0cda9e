"""Flags the trainer refuses before anything starts: out-of-range optimizer and data values, a patch
stage of one patch per sample, a TP that does not split the SwiGLU width, the layer implementation
(--transformer-impl, resolved when the flags are read), values that are not finite (--lr, --split,
blend weights), an empty --wandb-project and a --tensorboard-dir that is a file. Each ends the
command with exit code 2 and one stderr line naming the flag and its value, and the value next to
it is accepted. A warm-up as long as a stage, a profile window outside the job and a split without
validation documents are said."""

import pytest

from megatron_patch.architecture import specs
from megatron_patch.training.arguments import parse_args
from tests.training.common import refused_line, trainer_args


@pytest.mark.parametrize(
    "flag, bad, good",
    [
        ("--make-vocab-size-divisible-by", "0", "1"),
        ("--num-workers", "-1", "0"),
        ("--adam-beta1", "1.5", "0"),
        ("--adam-beta1", "nan", "0.9"),
        ("--adam-beta2", "1.0", "0.999"),
        ("--adam-beta2", "-0.1", "0.95"),
        ("--adam-eps", "0.0", "1e-12"),
        ("--adam-eps", "-0.001", "1e-08"),
        ("--weight-decay", "-1.0", "0"),
        ("--weight-decay", "inf", "0.1"),
    ],
)
def test_out_of_range_values_give_one_line_errors(tiny_corpus, capsys, flag, bad, good):
    line = refused_line(capsys, trainer_args(tiny_corpus, None, flag, bad))
    assert f"{flag} {bad} must" in line, line
    parse_args(trainer_args(tiny_corpus, None, flag, good), world_size=1)


def test_patch_stage_needs_two_patches_per_sample(tiny_corpus, capsys):
    """T=1 patch has no next patch: every target of the patch stage would be masked."""
    line = refused_line(capsys, trainer_args(tiny_corpus, None, "--seq-length", "1", "--patch-size", "4"))
    assert "--seq-length 1 with --patch-size 4" in line and "--seq-length >= 2" in line, line
    config = parse_args(trainer_args(tiny_corpus, None, "--seq-length", "2", "--patch-size", "4"), world_size=1)
    assert config.model.seq_length == 2
    # T=1 token is a sample with one target: fine without a patch stage
    parse_args(trainer_args(tiny_corpus, None, "--seq-length", "1", "--patch-size", "1"), world_size=1)
    parse_args(trainer_args(tiny_corpus, None, "--seq-length", "1", "--stage", "token"), world_size=1)


def test_tensor_parallel_size_must_split_the_swiglu_width(tiny_corpus, capsys, monkeypatch):
    """13b at TP=5: the 40 heads split, its SwiGLU width of 13824 does not (megatron asserted at build)."""
    argv = trainer_args(tiny_corpus, None, "--tensor-model-parallel-size", "5")
    argv[argv.index("tiny")] = "13b"
    monkeypatch.setenv("WORLD_SIZE", "5")  # as torchrun would launch it
    line = refused_line(capsys, argv)
    assert line == (
        "error: --tensor-model-parallel-size 5 does not divide the 13824 FFN hidden size of --model 13b: "
        "use one of 1, 2, 4, 8"
    ), line
    argv[argv.index("5")] = "4"
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_args(argv).model.tensor_parallel == 4


def test_transformer_engine_asked_for_where_it_does_not_import(tiny_corpus, capsys):
    if specs.transformer_engine_available():
        pytest.skip("transformer_engine imports on this machine")
    line = refused_line(capsys, trainer_args(tiny_corpus, None, "--transformer-impl", "transformer_engine"))
    assert "--transformer-impl transformer_engine: transformer_engine does not import" in line, line
    assert "--transformer-impl local" in line, line
    config = parse_args(trainer_args(tiny_corpus, None, "--rope-fusion"), world_size=1)
    assert config.model.transformer_impl == "local"  # auto, resolved when the flags are read
    assert config.flags["transformer_impl"] == "auto"  # what checkpoints record: the flag as given


def test_rope_fusion_where_auto_picks_transformer_engine(tiny_corpus, monkeypatch):
    """Where TE imports, --transformer-impl auto means TE, and --rope-fusion is megatron's own
    ``apply_rope_fusion`` (TE's kernel) rather than the local spec's fused RoPE. TE does not import
    here, so megatron's config refuses the setting: the proof that it reaches megatron."""
    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)
    for impl in ("auto", "transformer_engine"):
        argv = trainer_args(tiny_corpus, None, "--rope-fusion", "--transformer-impl", impl)
        model = parse_args(argv, world_size=1).model
        assert model.transformer_impl == "transformer_engine" and model.rope_fusion
        with pytest.raises(ValueError, match="apply_rope_fusion is not available"):
            model.transformer_config(cpu=True)
    unfused = parse_args(trainer_args(tiny_corpus, None), world_size=1).model
    assert unfused.transformer_impl == "transformer_engine" and not unfused.transformer_config(True).apply_rope_fusion
    config = parse_args(trainer_args(tiny_corpus, None, "--rope-fusion", "--transformer-impl", "local"), world_size=1)
    assert config.model.transformer_impl == "local"
    assert not config.model.transformer_config(cpu=True).apply_rope_fusion  # the local spec fuses it in SDPA


def test_async_save_without_save_is_one_line(tiny_corpus, capsys, tmp_path):
    line = refused_line(capsys, trainer_args(tiny_corpus, None, "--async-save"))
    assert line == "error: --async-save needs --save DIR"
    parse_args(trainer_args(tiny_corpus, tmp_path / "run", "--async-save"), world_size=1)  # with --save: accepted


def test_the_token_budget_may_be_written_in_e_notation(tiny_corpus, capsys):
    """--train-tokens 6.144e3 is 6144 (the launch scripts' comments write budgets as 360e9); a
    count that is not whole is refused in one line."""
    argv = trainer_args(tiny_corpus, None, train_iters=12)
    at = argv.index("--train-iters")
    plans = {
        text: parse_args(argv[:at] + ["--train-tokens", text] + argv[at + 2 :], world_size=1).plan.train_iters
        for text in ("6144", "6.144e3", "6_144")
    }
    assert set(plans.values()) == {12}, plans
    for bad in ("6144.5", "6144.00001", "1e30", "nan", "0x10"):
        line = refused_line(capsys, argv[:at] + ["--train-tokens", bad] + argv[at + 2 :])
        assert "--train-tokens" in line and bad in line, line


def test_a_token_budget_too_small_for_both_stages_names_the_budget_given(tiny_corpus, capsys):
    """Before: the message named --train-iters, a flag the user had not given."""
    argv = trainer_args(tiny_corpus, None, train_iters=12)
    at = argv.index("--train-iters")
    line = refused_line(capsys, argv[:at] + ["--train-tokens", "1000"] + argv[at + 2 :])
    assert "--train-tokens 1000 (1 step of 512) with lambda=0.667 leaves a stage with no steps" in line, line


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--lr", "nan"], "--lr nan / --min-lr 0.0: need finite"),
        (["--lr", "inf"], "--lr inf / --min-lr 0.0: need finite"),
        (["--min-lr", "nan"], "--min-lr nan: need finite"),
        (["--split", "nan,1,1"], "split 'nan,1,1' must be 1 to 3 finite"),
        (["--split", "1e400,1,0"], "split '1e400,1,0' must be 1 to 3 finite"),
        (["--wandb-project", "", "--wandb-exp-name", "run"], "--wandb-project is empty"),
    ],
    ids=["lr-nan", "lr-inf", "min-lr-nan", "split-nan", "split-inf", "wandb-empty"],
)
def test_values_that_are_not_finite_or_empty_give_one_line_errors(tiny_corpus, capsys, extra, expected):
    line = refused_line(capsys, trainer_args(tiny_corpus, None, *extra))
    assert expected in line, line


def test_a_blend_weight_that_is_not_finite_is_one_line(tiny_corpus, capsys):
    prefix = tiny_corpus["prefix"]
    line = refused_line(capsys, trainer_args(tiny_corpus, None, "--data-path", "inf", prefix, "1", prefix))
    assert "data_path weights [inf, 1.0] must be finite and > 0" in line, line


def test_a_tensorboard_dir_that_is_a_file_is_refused_at_start(tiny_corpus, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "file", tmp_path / "file" / "below"):
        line = refused_line(capsys, trainer_args(tiny_corpus, None, "--tensorboard-dir", str(path)))
        assert line == f"error: --tensorboard-dir {path}: {tmp_path / 'file'} on its path is a file: name a folder"


def test_warm_up_as_long_as_a_stage_and_a_profile_window_outside_the_job_are_said(tiny_corpus, tmp_path, caplog):
    """12 steps: 8 patch, 4 token. A warm-up of 4 steps ends the token stage at its peak LR; a
    profile window at iterations 20-30 never opens."""
    flags = ["--lr-warmup-iters", "4", "--profile", "--profile-step-start", "20", "--profile-step-end", "30"]
    parse_args(trainer_args(tiny_corpus, None, *flags, "--profile-dir", str(tmp_path)), world_size=1)
    assert "--lr-warmup-iters 4 is not less than the token stage's 4 iterations" in caplog.text
    assert "patch stage's" not in caplog.text
    assert "--profile-step-start 20 / --profile-step-end 30 lie outside this job's iterations 1-12" in caplog.text


def test_a_budget_of_more_than_a_thousand_passes_is_refused_before_any_index_is_built(tiny_corpus, capsys):
    """--train-iters 1e12 on the tiny corpus: megatron's sample index would need hundreds of GiB."""
    line = refused_line(capsys, trainer_args(tiny_corpus, None, train_iters=10**12))
    assert line.startswith("error: --train-iters/--train-tokens: 1000000000000 steps have the patch stage read"), line
    assert "at most 1000 passes: lower the budget or add data" in line, line


def test_a_split_without_validation_documents_says_validation_is_off(cpu_world, tiny_corpus, caplog):
    from megatron_patch.training import cli

    assert cli.main(trainer_args(tiny_corpus, None, "--split", "100,0,0", train_iters=2)) == 0
    assert "--split 100,0,0 holds no validation documents: validation (--eval-iters 1) is off" in caplog.text


def test_a_validation_of_more_than_a_thousand_passes_is_refused_before_any_index_is_built(
    tiny_corpus, capsys, monkeypatch
):
    """--eval-iters 100000 on the tiny corpus: each validation would re-read its few held-out
    documents about 1,400 times (minutes per validation); refused as the training stages' budget is."""
    from megatron_patch.training import run_datasets

    def never(*args, **kwargs):
        raise AssertionError("the datasets were built")

    monkeypatch.setattr(run_datasets, "build_stage_datasets", never)
    line = refused_line(capsys, trainer_args(tiny_corpus, None, "--eval-iters", "100000"))
    prefix = tiny_corpus["prefix"]
    assert line.startswith("error: --eval-iters 100000: one validation reads the validation documents of "), line
    assert f"--data-path {prefix} 1.4e+03 times (1600000 samples of 32 tokens, one pass holds 1140)" in line, line
    assert line.endswith(
        "at most 1000 passes: lower --eval-iters (to 71250 at most), or give --split 97,3,0 a larger validation share"
    ), line


def test_validation_may_read_its_documents_up_to_a_thousand_times():
    """The limit's edge: 10 samples of 32 tokens per pass, 16 per batch, so 625 batches are 1000
    passes (accepted) and 626 are not; no validation, or no validation documents, is no check."""
    from megatron_patch.errors import ArgumentError
    from megatron_patch.training.plan import make_plan

    def plan(eval_iters):
        flags = dict(patch_size=4, patch_data_fraction=2 / 3, stages="both", seq_length=32, micro_batch_size=4)
        return make_plan(**flags, global_batch_size=16, data_parallel_size=1, eval_iters=eval_iters, train_iters=12)

    valid_tokens = 10 * 32 + 1  # a sample reads 33 tokens, the next starts at the 33rd
    plan(625).check_validation_fits(valid_tokens, "--data-path corpus", "97,3,0")
    plan(0).check_validation_fits(valid_tokens)
    plan(10**6).check_validation_fits(0)
    with pytest.raises(ArgumentError) as refused:
        plan(626).check_validation_fits(valid_tokens, "--data-path corpus", "97,3,0")
    assert str(refused.value) == (
        "--eval-iters 626: one validation reads the validation documents of --data-path corpus 1e+03 times "
        "(10016 samples of 32 tokens, one pass holds 10); at most 1000 passes: lower --eval-iters (to 625 at most), "
        "or give --split 97,3,0 a larger validation share"
    )
