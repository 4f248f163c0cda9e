"""benchmarks/chaos.py's fixed subset in the suite: one SIGTERM trial at TP=1 (seed 4: the signal
lands after iteration 2, around the first save), resumed and compared with the reference run,
and a few cases of the bad-input matrix. The full runs and their table: benchmarks/RESULTS.md."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


chaos = _load("chaos")
bad_input_cases = _load("bad_input_cases")
bad_inputs = _load("bad_inputs")


@pytest.fixture(scope="module")
def one_trial(tiny_corpus, tmp_path_factory):
    """(exit status, printed table, JSON, work dir) of ``chaos.py --trials 1`` at TP=1, seed 4."""
    import contextlib
    import io

    work = tmp_path_factory.mktemp("chaos")
    out = work / "chaos.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = chaos.main(
            [
                "--data-path",
                tiny_corpus["prefix"],
                "--tokenizer-model",
                tiny_corpus["tokenizer"],
                "--trials",
                "1",
                "--layouts",
                "tp1",
                "--seed",
                "4",
                "--work-dir",
                str(work / "w"),
                "--output-json",
                str(out),
            ]
        )
    return code, printed.getvalue(), json.loads(out.read_text()), work / "w"


def test_one_sigterm_trial_resumes_to_the_reference(one_trial):
    code, printed, result, _ = one_trial
    assert code == 0, printed
    trial = result["trials"][0]
    assert trial["signal"] == "SIGTERM" and trial["after_iteration"] == 2 and trial["ok"], trial
    assert trial["exit"] == 0 and trial["workers_saved"] and trial["group_gone"], trial
    assert "1/1 trials resumed" in printed and "SIGTERM: 1/1 saved" in printed


def test_bad_input_matrix_cases(tiny_corpus, tmp_path, one_trial):
    """Rows of the matrix, one per kind of input: a JSONL line, a .bin/.idx pair, a checkpoint shard
    (of the trial's finished reference run), five trainer flags (four bad values; a sequence length
    the corpus cannot fill), and the tools' layout and input errors."""
    reference = str(one_trial[3] / "reference-tp1")
    cases = bad_input_cases.build_cases(
        str(tmp_path / "bad"),
        tiny_corpus["prefix"],
        tiny_corpus["tokenizer"],
        reference,
        chaos.checkpoint_dir(reference, chaos.ITERS),
    )
    assert len(cases) >= 80
    for name in (
        "pre-bad-json",
        "merge-truncated-bin",
        "export-zeroed-shard",
        "train-bad-lr",
        "train-seq-length-beyond-corpus",
        "train-exit-duration-zero",
        "train-profile-window",
        "train-tp3",
        "eval-tp3",
        "eval-bad-jsonl",
        "convert-world",
    ):
        result = bad_inputs.run_case(next(case for case in cases if case.name == name))
        assert result["ok"], result


def test_bad_flags_give_one_line(tmp_path, capsys):
    work = tmp_path / "w"
    common = ["--tokenizer-model", str(tmp_path / "tok.model"), "--work-dir", str(work)]
    assert chaos.main(["--data-path", str(tmp_path / "none"), *common]) == 2
    assert chaos.main(["--data-path", str(tmp_path / "none"), *common, "--trials", "-1"]) == 2
    assert chaos.main(common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert err[0] == f"error: {tmp_path / 'none'}.bin: no such file"
    assert err[1] == "error: --trials -1 must be >= 0"
    assert "--data-path" in err[2] and err[2].endswith("(see benchmarks/chaos.py --help)")
    assert not work.exists()  # nothing created before the flags are checked


def test_async_save_reaches_the_trials_and_not_the_references():
    opts = chaos.build_parser().parse_args(["--data-path", "d", "--tokenizer-model", "t", "--work-dir", "w"])
    assert "--async-save" not in chaos.run_args(opts, "tp1", "s")
    opts = chaos.build_parser().parse_args(
        ["--data-path", "d", "--tokenizer-model", "t", "--work-dir", "w", "--async-save"]
    )
    assert "--async-save" in chaos.run_args(opts, "dp2", "s")  # the trials and their resumes
    assert "--async-save" not in chaos.run_args(opts, "dp2", "s", trial=False)  # the reference
