"""The example pipelines' own checks, without training: the workdir's settings record, flag
validation, one-line errors, and what the reports say (from synthetic run records).
examples/quickstart.py and examples/reproduce_small.py run end to end in tests/test_quickstart.py
and tests/test_reproduce_small.py."""

import importlib.util
import json
import shutil

import pytest

from megatron_patch.errors import ArgumentError, UserError, VerificationError
from tests.conftest import REPO_ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quickstart():
    return _load("quickstart")


@pytest.fixture(scope="module")
def repro():
    return _load("reproduce_small")


@pytest.fixture(scope="module")
def pipeline(quickstart):
    import pipeline  # examples/, on the path once an example script is loaded

    return pipeline


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


# --- the workdir's settings record ------------------------------------------------------------


def test_a_fresh_workdir_records_its_settings_and_a_rerun_of_them_is_accepted(pipeline, tmp_path):
    work = tmp_path / "w"
    pipeline.check_workdir(work, {"model": "tiny", "path": tmp_path}, "demo")
    assert json.loads((work / "settings.json").read_text()) == {"model": "tiny", "path": str(tmp_path)}
    (work / "tokenizer.model").write_text("an output")
    pipeline.check_workdir(work, {"model": "tiny", "path": tmp_path}, "demo")  # an interrupted run, re-run
    pipeline.check_workdir(tmp_path / "empty", {"model": "tiny"}, "demo")  # an existing empty folder too


def test_a_workdir_of_other_settings_is_refused_once_it_holds_an_output(pipeline, tmp_path):
    work = tmp_path / "w"
    pipeline.check_workdir(work, {"cpu": True, "model": "tiny"}, "demo")
    (work / "data").mkdir()  # an empty folder is no output: the record of a failed first attempt is replaced
    pipeline.check_workdir(work, {"cpu": False, "model": "tiny"}, "demo")
    assert json.loads((work / "settings.json").read_text())["cpu"] is False
    (work / "data" / "train.idx").write_text("an output")
    with pytest.raises(ArgumentError, match=r"holds outputs of demo made with other settings \(cpu False -> True\)"):
        pipeline.check_workdir(work, {"cpu": True, "model": "tiny"}, "demo")


def test_files_without_a_record_a_file_and_a_broken_record_are_refused(pipeline, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "eval_baseline.json").write_text("{}")
    with pytest.raises(ArgumentError, match="holds files but no settings.json saying what made them: remove it"):
        pipeline.check_workdir(tmp_path / "old", {"model": "tiny"}, "demo")
    assert not (tmp_path / "old" / "settings.json").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ArgumentError, match="is a file, not a folder: choose another --workdir"):
        pipeline.check_workdir(tmp_path / "file", {}, "demo")
    for name in ("seeded", "unseeded"):  # a tokenizer given to the reproduction is an input, not an output
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.model").write_text("a model")
    pipeline.check_workdir(tmp_path / "seeded", {"model": "tiny"}, "demo", seeded=("tokenizer.model",))
    with pytest.raises(ArgumentError, match="holds files but no settings.json"):
        pipeline.check_workdir(tmp_path / "unseeded", {"model": "tiny"}, "demo")  # where it is no input
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "settings.json").write_text("{")
    with pytest.raises(ArgumentError, match="settings.json: not a settings record"):
        pipeline.check_workdir(tmp_path / "broken", {}, "demo")


# --- the quick start ---------------------------------------------------------------------------


def test_the_quickstart_refuses_a_file_and_a_used_folder_as_workdir_in_one_line(quickstart, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert quickstart.main(["--reduced", "--workdir", str(tmp_path / "file")]) == 2
    assert _one_error_line(capsys) == (
        f"error: --workdir {tmp_path / 'file'} is a file, not a folder: choose another --workdir"
    )
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "eval_baseline.json").write_text("{}")
    assert quickstart.main(["--reduced", "--workdir", str(tmp_path / "used")]) == 2
    assert "holds files but no settings.json" in _one_error_line(capsys)
    # an OSError of the script's own writes is one line naming the path
    assert quickstart.main(["--reduced", "--workdir", str(tmp_path / "file" / "below")]) == 2
    assert _one_error_line(capsys).startswith(f"error: {tmp_path / 'file' / 'below'}: Not a directory")
    assert quickstart.main(["--reduced", "--no-such-flag"]) == 2
    assert "--no-such-flag" in _one_error_line(capsys)


def test_the_quickstart_refuses_a_token_stage_made_before_the_patch_stage_was_trained_again(
    quickstart, pipeline, tmp_path, capsys, monkeypatch
):
    """The conversion and the token stage are made from the patch stage: after a retraining of it
    (its folder removed, the pipeline re-run) they are stale, and are named, not reused."""
    import os

    work = tmp_path / "w"
    pipeline.check_workdir(work, quickstart.settings(True), "quickstart")
    for name in ("token_init", "token_stage", "patch_stage"):
        (work / name).mkdir()
    os.utime(work / "token_init", (1_000_000, 1_000_000))  # made long before the patch stage's summary
    (work / "patch_stage" / "summary.json").write_text("{}")
    monkeypatch.setattr(quickstart, "prepare_data", lambda work, s: {})
    monkeypatch.setattr(quickstart, "training_flags", lambda *args, **kwargs: [])
    monkeypatch.setattr(quickstart, "run_step", lambda *args, **kwargs: None)  # every step done already
    assert quickstart.main(["--reduced", "--workdir", str(work)]) == 1
    assert _one_error_line(capsys) == (
        f"error: {work / 'token_init'} is older than the patch stage's run ({work / 'patch_stage'}), trained again "
        f"since: remove {work / 'token_init'} and {work / 'token_stage'}, then re-run"
    )


def _quickstart_runs(tmp_path, token_tokens=8192, documents=3):
    """Summaries and evaluations of the quick start's runs as the trainer and evaluate.py write them."""
    step = 1024  # tokens per step

    def summary(stage, tokens, cost, flops_per_token):
        stages = {stage: {"iterations": tokens // step, "tokens": tokens, "flops": tokens * flops_per_token}}
        stages[stage]["seconds"] = tokens / 1000
        return {"total_tokens": tokens, "stages": stages, "theoretical_relative_cost": cost}

    summaries = {
        "patch_stage": summary("patch", 16384, 0.25, 0.25),
        "token_stage": summary("token", token_tokens, 1.0, 1.0),
        "control": summary("token", token_tokens, 1.0, 1.0),
        "baseline": summary("token", 24576, 1.0, 1.0),
    }
    runs = {}
    for name, content in summaries.items():
        runs[name] = tmp_path / name
        runs[name].mkdir(parents=True)
        (runs[name] / "summary.json").write_text(json.dumps(content))
    scored = {"documents": documents, "tokens": 5000, "model": "tiny", "dtype": "float32"}
    evaluations = {"token_stage": dict(scored, loss=5.0), "control": dict(scored, loss=5.0), "baseline": dict(scored)}
    evaluations["baseline"]["loss"] = 4.5
    return runs, evaluations


def test_the_quickstart_report_says_what_it_measured_and_takes_the_trainers_cost(quickstart, tmp_path, capsys):
    runs, evaluations = _quickstart_runs(tmp_path)
    quickstart._report(runs, evaluations, held_out=10, reduced=True)
    out = capsys.readouterr().out
    assert "model tiny (float32, CPU, TP=2); token-level loss on 3 of the 10 held-out documents (5,000 tokens)" in out
    assert "--reduced" in out
    # (16384 x 1/4 + 8192 x 1) / 24576: the trainer's per-job figures, weighted by their tokens
    assert "theory lambda/K + 1 - lambda = 0.500 (the trainer's, at the realised lambda 0.667)" in out
    assert "against the token-only baseline" in out
    assert "patch + token train 16,384 + 8,192 = 24,576 tokens, the baseline the same 24,576" in out
    assert "the patch stage neither helped nor hurt the token stage" in out  # a transfer of exactly 0


def test_the_quickstart_report_refuses_runs_of_different_tokens(quickstart, tmp_path):
    runs, evaluations = _quickstart_runs(tmp_path / "a", token_tokens=4096)
    with pytest.raises(VerificationError, match=r"patch \+ token trained 16384 \+ 4096 tokens, the baseline 24576"):
        quickstart._report(runs, evaluations, held_out=10, reduced=True)
    runs, evaluations = _quickstart_runs(tmp_path / "b")
    evaluations["control"]["documents"] = 10  # scored on other documents
    with pytest.raises(VerificationError, match="the runs are not comparable"):
        quickstart._report(runs, evaluations, held_out=10, reduced=True)


# --- the reproduction: flags ---------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path, tiny_jsonl):
    """--reduced data: the bundled corpus (102 documents) to train on, stand-ins for the evaluation sets."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copyfile(tiny_jsonl, folder / "tiny.jsonl.xz")
    for name in ("valid", "wikitext103_test"):
        shutil.copyfile(tiny_jsonl, folder / f"{name}.jsonl.xz")
    return folder


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--nproc", "0"], "--nproc 0: give N >= 1 processes per run"),
        (["--nproc", "-1"], "--nproc -1: give N >= 1 processes per run"),
        (["--epochs", "inf"], "--epochs inf: give N passes from 1 to 1000"),
        (["--epochs", "nan"], "--epochs nan: give N passes from 1 to 1000"),
        (["--epochs", "0.5"], "--epochs 0.5: give N passes from 1 to 1000"),
        (["--seeds", "0"], "--seeds 0: give N >= 1"),
        (["--train-documents", "500"], "--train-documents 500: "),
    ],
)
def test_bad_flags_are_one_line_and_record_nothing(repro, tmp_path, data_dir, capsys, flags, message):
    work = tmp_path / "w"
    argv = ["--reduced", "--cpu", "--workdir", str(work), "--data-dir", str(data_dir), *flags]
    assert repro.main(argv) == 2
    assert message in _one_error_line(capsys)
    assert not work.exists()


def _stop_at_the_first_step(monkeypatch, repro):
    def stop(step, *args, **kwargs):
        raise UserError(f"stopped at {step}")

    monkeypatch.setattr(repro, "_run", stop)


def test_a_refused_document_count_leaves_the_workdir_free_for_another(repro, tmp_path, data_dir, capsys, monkeypatch):
    _stop_at_the_first_step(monkeypatch, repro)
    argv = ["--reduced", "--cpu", "--workdir", str(tmp_path / "w"), "--data-dir", str(data_dir)]
    assert repro.main(argv + ["--train-documents", "500"]) == 2
    assert "holds 102 documents; give at most 102" in _one_error_line(capsys)
    assert repro.main(argv + ["--train-documents", "50"]) == 2
    assert _one_error_line(capsys) == "error: stopped at tokenizer"  # accepted: it went on to the first step
    assert len((tmp_path / "w" / "data" / "train_first50.jsonl").read_text().splitlines()) == 50


def test_a_cpu_workdir_refuses_a_gpu_run(repro, tmp_path, data_dir, capsys, monkeypatch):
    _stop_at_the_first_step(monkeypatch, repro)
    argv = ["--reduced", "--workdir", str(tmp_path / "w"), "--data-dir", str(data_dir)]
    assert repro.main(argv + ["--cpu"]) == 2
    assert _one_error_line(capsys) == "error: stopped at tokenizer"
    (tmp_path / "w" / "tokenizer.model").write_text("an output")
    assert repro.main(argv) == 2
    assert "made with other settings (cpu True -> False)" in _one_error_line(capsys)
    assert json.loads((tmp_path / "w" / "settings.json").read_text())["nproc"] == 1  # the report compares wall times
    assert repro.main(argv + ["--cpu"]) == 2  # the same settings: accepted
    assert _one_error_line(capsys) == "error: stopped at tokenizer"


# --- the reproduction: its report ----------------------------------------------------------------


def _write_run(work, folder, total_tokens, stages, cost, losses, documents=4):
    """A finished run as the trainer leaves it (summary.json, metrics.jsonl) and its evaluations."""
    (work / folder).mkdir()
    summary = {
        "interrupted": False,
        "stage_split": "documents",
        "total_tokens": total_tokens,
        "theoretical_relative_cost": cost,
        "stages": {
            name: {"iterations": tokens // 1024, "tokens": tokens, "flops": flops, "seconds": 10.0, "epochs": 1.0}
            for name, (tokens, flops) in stages.items()
        },
    }
    (work / folder / "summary.json").write_text(json.dumps(summary))
    steps = total_tokens // 1024
    records = [{"kind": "train", "iteration": 24 - steps + 1, "stage_iteration": 1, "loss": 6.0}]
    records.append({"kind": "valid", "iteration": 24, "loss": 5.0})
    (work / folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for data, loss in zip(("valid", "wikitext103"), losses):
        evaluation = {"loss": loss, "documents": documents, "tokens": 3000, "model": "tiny", "dtype": "float32"}
        evaluation["input"] = [f"/data/{'valid' if data == 'valid' else 'wikitext103_test'}.jsonl.xz"]
        (work / f"eval_{folder}_{data}.json").write_text(json.dumps(evaluation))


@pytest.fixture
def repro_work(tmp_path):
    """A reduced CPU workdir: token-only (seed 1), lambda-2_3 and its control (seeds 1, 2), and
    lambda-1_2 trained but not evaluated."""
    work = tmp_path / "repro"
    work.mkdir()
    record = {"reduced": True, "cpu": True, "nproc": 1, "model": "tiny", "max_documents": 4, "epochs": None}
    (work / "settings.json").write_text(json.dumps(record))
    _write_run(work, "token-only", 24576, {"token": (24576, 24e12)}, 1.0, (5.0, 6.0))
    for seed, folder in ((1, "lambda-2_3"), (2, "lambda-2_3-seed2")):
        stages = {"patch": (16384, 4e12), "token": (8192, 8e12)}
        _write_run(work, folder, 24576, stages, 0.5, (5.1 + seed / 100, 6.1))
    for seed, folder in ((1, "control-lambda-2_3"), (2, "control-lambda-2_3-seed2")):
        _write_run(work, folder, 8192, {"token": (8192, 8e12)}, 1.0, (5.3, 6.3 + seed / 100))
    _write_run(work, "lambda-1_2", 24576, {"patch": (12288, 3e12), "token": (12288, 12e12)}, 0.625, (5, 6))
    (work / "eval_lambda-1_2_wikitext103.json").unlink()
    return work


def _report_module(repro):
    import reproduce_small_report  # examples/, on the path once reproduce_small.py is loaded

    return reproduce_small_report


def test_the_report_covers_every_finished_run_and_says_what_it_measured(repro, repro_work, capsys, monkeypatch):
    report_module = _report_module(repro)
    monkeypatch.setattr(report_module, "_plot", lambda plt, curves, path: path.write_bytes(b"png"))
    report_module.write_report(repro_work, ["lambda-2_3", "control-lambda-2_3"])
    report = (repro_work / "report.md").read_text()
    assert report.startswith("# Small-scale reproduction, --reduced smoke run (")
    assert (
        "What was measured: --reduced smoke run (tiny model and budget: not the reproduction's numbers), on CPU; "
        "model tiny trained in float32; one pass over the training documents, split by documents between the "
        "stages; seeds 1, 2; held-out token-level loss on 4 documents of valid.jsonl.xz (3,000 tokens) and 4 "
        "documents of wikitext103_test.jsonl.xz (3,000 tokens) (--reduced scores only the first 4 documents of "
        "each file)."
    ) in report
    # every finished run, the trainer's cost against the run's own tokens, FLOPs against token-only's
    assert "| token-only | 1 | 24,576 | 1.000 | 1.000 | 10 | 5.0000 |" in report
    assert "| lambda-2_3 | 1, 2 | 24,576 | 0.500 | 0.500 | 20 | 5.1150 ± 0.0071 [5.1100, 5.1200] |" in report
    assert "| control-lambda-2_3 | 1, 2 | 8,192 | 1.000 | 0.333 | 10 |" in report
    assert "| lambda-2_3 | 1, 2 | 0.1850 ± 0.0071 [0.1800, 0.1900] |" in report  # transfer, paired by seed
    assert "Trained but not evaluated, so not reported: lambda-1_2" in report
    assert "| lambda-1_2 |" not in report
    assert "![validation loss](loss_curves.png)" in report
    out = capsys.readouterr().out
    assert f"report: {repro_work / 'report.md'}, over every finished run in the workdir (token-only from earlier" in out
    assert sorted(json.loads((repro_work / "curves.json").read_text())) == [
        "control-lambda-2_3",
        "lambda-2_3",
        "token-only",
    ]


def test_a_failed_plot_keeps_the_report(repro, repro_work, monkeypatch):
    pytest.importorskip("matplotlib")
    report_module = _report_module(repro)

    def fail(plt, curves, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(report_module, "_plot", fail)
    with pytest.raises(OSError):
        report_module.write_report(repro_work, ["token-only"])
    report = (repro_work / "report.md").read_text()
    assert "| token-only | 1 |" in report and "loss_curves.png" not in report


def test_runs_scored_on_other_documents_are_not_reported_together(repro, repro_work):
    evaluation = json.loads((repro_work / "eval_token-only_valid.json").read_text())
    (repro_work / "eval_token-only_valid.json").write_text(json.dumps(dict(evaluation, documents=10)))
    with pytest.raises(VerificationError, match="the runs' valid evaluations scored different documents"):
        _report_module(repro).write_report(repro_work, ["token-only"])


def test_an_output_older_than_its_run_is_made_again(pipeline, tmp_path, capsys):
    """An evaluation (or conversion) written before its run was trained again is stale: the step runs
    again, where an output newer than the run is kept."""
    import os
    import sys

    save, output = tmp_path / "run", tmp_path / "eval_run.json"
    save.mkdir()
    output.write_text("{}")
    (save / "summary.json").write_text("{}")
    os.utime(output, (1_000_000, 1_000_000))  # written long before the run's summary
    write = [sys.executable, "-c", f"open({str(output)!r}, 'w').write('new')"]
    step = dict(finished=lambda done: pipeline.made_after_run(done, save), extra_env={})
    pipeline.run_step("evaluate", write, output, **step)
    assert output.read_text() == "new"
    output.write_text("kept")
    pipeline.run_step("evaluate", write, output, **step)
    assert output.read_text() == "kept" and "evaluate: done already" in capsys.readouterr().out
