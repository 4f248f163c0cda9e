"""The trainer in-process (a world of one): both stages, the stage switch, K=1 against stock
GPTModel, NaN stops, a failure outside the package keeping its traceback, pruning. (Where a run
starts, resumes and whose --save it takes, and the one-line refusals of a bad --load, --save or
--pretrained-checkpoint: test_run_start.py.)"""

import pytest
import torch
from megatron.core.models.gpt import GPTModel

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as checkpoint
from megatron_patch.training import builders, cli, loop
from megatron_patch.training.arguments import parse_args
from tests.training.common import train_records, trainer_args


def _run(argv):
    from megatron_patch.runtime import parallel

    args = parse_args(argv, world_size=1)
    parallel.init_model_parallel(1, 1, seed=args.seed)
    trainer = loop.Trainer(args)
    return trainer, trainer.run()


def _optimizer_state_size(optimizer) -> int:
    """Parameters with Adam state (0 right after the stage switch's reset)."""
    return sum(len(sub.optimizer.state) for sub in builders.sub_optimizers(optimizer))


def _tensorboard_scalars(folder):
    """{tag: [(step, value), ...]} of the event files in ``folder`` (skips without tensorboard)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_two_stages_train_and_switch_resets_optimizer_and_lr(cpu_world, tiny_corpus, tmp_path, monkeypatch):
    resets = []
    original_reset = loop.reset_optimizer_state

    def spy_reset(optimizer):
        before = _optimizer_state_size(optimizer)
        groups = [group for sub in builders.sub_optimizers(optimizer) for group in sub.optimizer.param_groups]
        for group in groups:  # where TE's and Apex's FusedAdam count steps (not installed here)
            group["step"] = 41
        original_reset(optimizer)
        assert not any("step" in group for group in groups)  # the first token-stage update is step 1
        resets.append((before, _optimizer_state_size(optimizer)))

    monkeypatch.setattr(loop, "reset_optimizer_state", spy_reset)
    trainer, summary = _run(
        trainer_args(
            tiny_corpus,
            tmp_path / "run",
            "--eval-interval",
            "6",
            "--tensorboard-dir",
            str(tmp_path / "tb"),
            train_iters=24,
        )
    )
    # patch stage starts from an empty state; the switch empties a full one
    assert resets[0] == (0, 0) and resets[1][0] > 0 and resets[1][1] == 0
    records = train_records(tmp_path / "run")
    patch = [records[i] for i in range(1, 17)]
    token = [records[i] for i in range(17, 25)]
    assert {r["stage"] for r in patch} == {"patch"} and {r["stage"] for r in token} == {"token"}
    # the LR warmup restarts: the first logged LR of each stage is lr/warmup
    assert patch[0]["lr"] == pytest.approx(1.5e-3) and token[0]["lr"] == pytest.approx(1.5e-3)
    assert patch[1]["lr"] == pytest.approx(3e-3) and token[1]["lr"] == pytest.approx(3e-3)
    # both stages learn
    assert sum(r["loss"] for r in patch[-3:]) < sum(r["loss"] for r in patch[:3])
    assert sum(r["loss"] for r in token[-3:]) < sum(r["loss"] for r in token[:3])
    valid = train_records(tmp_path / "run", kind="valid")
    assert valid[6]["loss"] > valid[24]["loss"]
    assert summary["relative_flops_vs_token_only"] == pytest.approx(0.5)
    # each stage reads only its own documents
    patch_docs = set(trainer.datasets.patch_train.indices.tolist())
    token_docs = set(trainer.datasets.token_train.indices.tolist())
    assert patch_docs and token_docs and not patch_docs & token_docs
    # the boundary checkpoint and the final one are complete
    assert folders.read_tracker(str(tmp_path / "run")) == 24
    meta = checkpoint.read_metadata(folders.checkpoint_dir(str(tmp_path / "run"), 16))
    assert meta["progress"]["stage"] == "patch" and meta["progress"]["stage_complete"]
    # TensorBoard (last: skips without it) holds the same curves as metrics.jsonl
    events = _tensorboard_scalars(tmp_path / "tb")
    assert [step for step, _ in events["train/patch-loss"]] == list(range(1, 17))
    assert [step for step, _ in events["train/loss"]] == list(range(17, 25))
    assert events["train/loss"][-1][1] == pytest.approx(records[24]["loss"], rel=1e-6)
    assert dict(events["valid/loss"])[24] == pytest.approx(valid[24]["loss"], rel=1e-6)
    assert {"train/lr", "train/grad_norm", "train/skipped", "train/tokens_per_s", "train/tflops_per_gpu"} <= set(events)
    assert dict(events["train/patch_size"]) == {i: 4.0 if i <= 16 else 1.0 for i in range(1, 25)}


def test_fused_torch_adam_follows_foreach_and_resumes_bit_for_bit(cpu_world, tiny_corpus, tmp_path):
    """--torch-adam-impl fused switches megatron's fallback torch AdamW (no TE/Apex here) to torch's
    fused kernel: the trajectory is foreach's up to rounding, and a distributed-optimizer run resumed
    from its iteration-5 checkpoint (mid patch stage) repeats it exactly (Adam's step counters and
    moments restored)."""
    common = [
        "--use-distributed-optimizer",
        "--eval-iters",
        "0",
        "--save-interval",
        "5",
        "--keep-last-checkpoints",
        "0",
    ]
    _run(trainer_args(tiny_corpus, tmp_path / "foreach", *common, train_iters=12))
    trainer, _ = _run(
        trainer_args(tiny_corpus, tmp_path / "fused", *common, "--torch-adam-impl", "fused", train_iters=12)
    )
    adams = builders._torch_adams(trainer.optimizer)
    assert adams and all(group["fused"] and not group["foreach"] for adam in adams for group in adam.param_groups)
    assert all(state["step"].item() == 4 for adam in adams for state in adam.state.values())  # token steps
    _run(
        trainer_args(
            tiny_corpus,
            tmp_path / "resumed",
            *common,
            "--torch-adam-impl",
            "fused",
            "--load",
            str(tmp_path / "fused" / "iter_0000005"),
            train_iters=12,
        )
    )
    foreach, fused, resumed = (train_records(tmp_path / run) for run in ("foreach", "fused", "resumed"))
    assert sorted(resumed) == list(range(6, 13))
    for iteration in range(1, 13):
        assert fused[iteration]["loss"] == pytest.approx(foreach[iteration]["loss"], rel=1e-5), iteration
        if iteration >= 6:
            assert resumed[iteration]["loss"] == fused[iteration]["loss"], iteration
    assert any(fused[i]["loss"] != foreach[i]["loss"] for i in range(2, 13))  # a different kernel ran


@pytest.mark.gpu
def test_fused_torch_adam_resumes_on_gpu(world, model_parallel, tiny_corpus, tmp_path):
    """On CUDA torch's fused AdamW keeps each step counter on the parameter's device; a bf16
    distributed-optimizer run resumed mid token stage (iteration 10) must put them there again, one
    per parameter, holding the stage's step count (2 + the 2 steps after the resume). The saves go
    to the background (``--async-save``): iteration 10's is copied off the GPU and written by a
    forked process, and the resume reads it."""
    model_parallel(1, 1)
    argv = [
        arg
        for arg in trainer_args(
            tiny_corpus,
            tmp_path / "run",
            "--bf16",
            "--use-distributed-optimizer",
            "--torch-adam-impl",
            "fused",
            "--eval-iters",
            "0",
            "--save-interval",
            "5",
            "--keep-last-checkpoints",
            "0",
            "--async-save",
            train_iters=12,
        )
        if arg != "--cpu"
    ]
    _run(argv)
    # into a new --save: the run's folder still holds iteration 12, which a resume there would not overwrite
    resume = ["--load", str(tmp_path / "run" / "iter_0000010"), "--save", str(tmp_path / "resumed")]
    trainer, _ = _run(argv + resume)
    states = [
        (param, state) for adam in builders._torch_adams(trainer.optimizer) for param, state in adam.state.items()
    ]
    assert states and len({id(state["step"]) for _, state in states}) == len(states)
    for param, state in states:
        assert state["step"].device == param.device and param.is_cuda and state["step"].item() == 4


class StockGPT(GPTModel):
    """megatron's GPTModel, unchanged, behind the trainer's call: next-token targets ``[b, s, 1]``
    in, per-target losses ``[b, s, 1]`` out."""

    def forward(self, input_ids, position_ids, attention_mask, labels, patch_size):
        assert patch_size == 1
        # [b, s, 1] -> [b, s] -> stock GPTModel -> [b, s] -> [b, s, 1]
        return super().forward(input_ids, position_ids, attention_mask, labels=labels.squeeze(-1)).unsqueeze(-1)


def test_token_only_training_equals_stock_gpt_model(cpu_world, tiny_corpus, tmp_path, monkeypatch):
    argv = ["--patch-size", "1", "--eval-iters", "0"]
    _run(trainer_args(tiny_corpus, tmp_path / "patch_model", *argv, train_iters=6))

    def build_stock(
        config,
        vocab_size,
        seq_length,
        *,
        pre_process,
        post_process,
        use_transformer_engine,
        vp_stage,
        fused_rope,
        fused_cross_entropy,
        sdpa_backend,
    ):
        from megatron_patch.architecture.specs import get_decoder_block_spec

        assert not fused_rope and not fused_cross_entropy  # stock megatron applies RoPE and scores itself
        assert sdpa_backend == "auto"

        return StockGPT(
            config=config,
            transformer_layer_spec=get_decoder_block_spec(config),
            vocab_size=vocab_size,
            max_sequence_length=seq_length,
            pre_process=pre_process,
            post_process=post_process,
            position_embedding_type="rope",
        )

    from megatron_patch.architecture import build

    monkeypatch.setattr(build, "build_patch_gpt_model", build_stock)
    _run(trainer_args(tiny_corpus, tmp_path / "stock", *argv, train_iters=6))
    ours, stock = train_records(tmp_path / "patch_model"), train_records(tmp_path / "stock")
    assert [ours[i]["loss"] for i in range(1, 7)] == [stock[i]["loss"] for i in range(1, 7)]
    assert [ours[i]["grad_norm"] for i in range(1, 7)] == [stock[i]["grad_norm"] for i in range(1, 7)]


def test_nan_loss_stops_without_saving_the_bad_state(cpu_world, tiny_corpus, tmp_path, capsys):
    save = tmp_path / "nan"
    code = cli.main(
        trainer_args(
            tiny_corpus,
            save,
            "--lr",
            "1e30",
            "--lr-warmup-iters",
            "0",
            "--clip-grad",
            "0",
            "--save-interval",
            "1",
            "--eval-iters",
            "0",
        )
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    # the gradient check (before the reduction) or the loss check (after it) stops the step
    assert len(err) == 1 and err[0].startswith(("error: loss is ", "error: a gradient is ")), err
    assert "resume from the last checkpoint" in err[0]
    records = train_records(save)
    last_good = max(records)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records.values())
    assert folders.read_tracker(str(save)) == last_good  # nothing written after the bad step


def test_nan_gradient_of_a_finite_loss_stops_without_applying_it(cpu_world, tiny_corpus, tmp_path, capsys, monkeypatch):
    """bf16 has no loss scaler to skip a step: a NaN gradient (here put into one weight's gradient
    from the third backward on, the loss staying finite) stops the run before the update."""
    build = builders.build_model_chunks
    backwards = []

    def nan_from_the_third_backward(gradient):
        backwards.append(1)
        return gradient * float("nan") if len(backwards) >= 3 else gradient

    def chunks_with_a_nan_gradient(*args, **kwargs):
        chunks = build(*args, **kwargs)
        next(chunks[0].parameters()).register_hook(nan_from_the_third_backward)
        return chunks

    monkeypatch.setattr(builders, "build_model_chunks", chunks_with_a_nan_gradient)
    save = tmp_path / "nan-grad"
    argv = trainer_args(tiny_corpus, save, "--save-interval", "1", "--eval-iters", "0")  # 1 micro-batch per step
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: a gradient is NaN or Inf (the loss, "), err
    assert "is not): stopping without applying this step" in err[0], err
    records = train_records(save)
    assert sorted(records) == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records.values())
    assert folders.read_tracker(str(save)) == 2  # nothing written after the bad step


def test_a_failure_outside_this_package_shows_its_traceback(cpu_world, tiny_corpus, tmp_path, capsys, monkeypatch):
    """Our own checks end in one line (exit 2); an error raised in torch or megatron is not bad input
    and keeps its traceback (exit 1)."""

    def run(self):
        torch.zeros(2).view(3)  # a RuntimeError from torch itself

    monkeypatch.setattr(loop.Trainer, "run", run)
    code = cli.main(trainer_args(tiny_corpus, tmp_path / "run", train_iters=3))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert err[0] == "Traceback (most recent call last):" and any("torch.zeros(2).view(3)" in line for line in err)
    assert err[-1].startswith("error: unexpected RuntimeError in ") and "test_trainer.py:" in err[-1], err[-1]


def test_pruning_keeps_the_newest_checkpoints_and_the_stage_boundary(cpu_world, tiny_corpus, tmp_path):
    """--keep-last-checkpoints 2 with a save every 2 steps: 2, 4 and 6 go, 10 and 12 stay, and so
    does 8, the patch stage's last (what --pretrained-checkpoint and the conversion tool read)."""
    save = tmp_path / "run"
    _run(trainer_args(tiny_corpus, save, "--save-interval", "2", "--eval-iters", "0", train_iters=12))
    assert sorted(path.name for path in save.glob("iter_*")) == ["iter_0000008", "iter_0000010", "iter_0000012"]


def test_seq_length_zero_is_refused(tiny_corpus, capsys):
    """0 is a value, not "the preset's default" (the bad-input matrix found it accepted)."""
    assert cli.main(trainer_args(tiny_corpus, None, "--seq-length", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seq-length 0 must be >= 1" in err[0], err


@pytest.mark.parametrize("stage_split", ["documents", "epochs"])
def test_seq_length_beyond_the_corpus_is_refused_before_any_step(cpu_world, tiny_corpus, tmp_path, capsys, stage_split):
    """T = 100,000 on the tiny corpus: one patch step would read 4 samples of 400,000 tokens, more
    than the stage's documents hold; refused at start (it used to run for minutes with no step),
    and nothing is left in --save."""
    run = tmp_path / "run"
    argv = trainer_args(tiny_corpus, run, "--seq-length", "100000", "--stage-split", stage_split, train_iters=300)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: --seq-length 100000: one step of the patch stage reads 4 samples of 400000 tokens")
    assert tiny_corpus["prefix"] in err[0] and "lower --seq-length or --global-batch-size" in err[0]
    assert not run.exists()
