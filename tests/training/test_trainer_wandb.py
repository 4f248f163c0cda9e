"""The trainer's W&B flags (Megatron's --wandb-project / --wandb-exp-name / --wandb-save-dir): an
offline run of the tiny two-stage trainer leaves a W&B run whose history holds the same losses, per
global iteration, as metrics.jsonl, and whose summary holds summary.json's figures; a resumed run
continues the same W&B run (its id kept in --save)."""

import glob
import json
import os

import pytest

from megatron_patch.training import cli
from tests.training.common import train_records, trainer_args
from tests.training.test_tracking import _history, _records, _wait_for_exit_record


def _summary(run_file):
    """``{key: value}`` of the run's summary records (the last value per key)."""
    summary = {}
    for record in _records(run_file):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return summary


def test_offline_wandb_run_holds_the_trainers_scalars(
    world, model_parallel, tiny_corpus, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("wandb")
    model_parallel(1, 1)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save = tmp_path / "run"
    argv = trainer_args(
        tiny_corpus,
        save,
        "--eval-iters",
        "1",
        "--wandb-project",
        "patch-tests",
        "--wandb-exp-name",
        "tiny",
        train_iters=6,
    )
    assert cli.main(argv) == 0, capsys.readouterr().err
    run_files = glob.glob(str(save / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1, run_files
    _wait_for_exit_record(run_files[0])
    history = _history(run_files[0])
    records = train_records(save)
    for iteration, record in records.items():
        tag = "train/patch-loss" if record["stage"] == "patch" else "train/loss"
        assert history[iteration][tag] == pytest.approx(record["loss"], rel=1e-6), iteration
        assert history[iteration]["train/patch_size"] == record["patch_size"], iteration
        assert history[iteration]["train/run_tokens"] == record["run_tokens"], iteration
    valid = train_records(save, kind="valid")
    assert valid and all(history[i]["valid/loss"] == pytest.approx(r["loss"], rel=1e-6) for i, r in valid.items())
    summary = _last_summary(save)
    run_summary = _summary(run_files[0])
    assert run_summary["total_tokens"] == summary["total_tokens"]
    assert run_summary["stages"]["patch"]["last_patch_loss"] == pytest.approx(
        summary["stages"]["patch"]["last_patch_loss"]
    )

    # the run again with --load (nothing left to train): the same W&B run id, from --save
    run_id = (save / "wandb_run_id").read_text().strip()
    assert os.path.basename(run_files[0]) == f"run-{run_id}.wandb"
    assert cli.main(argv + ["--load", str(save)]) == 0, capsys.readouterr().err
    run_files = glob.glob(str(save / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert sorted(os.path.basename(f) for f in run_files) == [f"run-{run_id}.wandb"] * 2, run_files


def _last_summary(save):
    with open(save / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == "summary"][-1]


def test_wandb_project_without_a_name_is_one_line(world, model_parallel, tiny_corpus, tmp_path, capsys):
    model_parallel(1, 1)
    code = cli.main(trainer_args(tiny_corpus, tmp_path / "run", "--wandb-project", "p"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--wandb-project p needs --wandb-exp-name" in err[0], err
    assert not (tmp_path / "run").exists()
