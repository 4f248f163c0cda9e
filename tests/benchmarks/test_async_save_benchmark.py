"""benchmarks/async_save.py end to end with the tiny preset (two trainer runs of a few seconds):
its table and JSON, the background saves found in the async run's records, and its one-line
errors. Whether background saves pay is measured by the script, not asserted here."""

import json

from tests.benchmarks.script_helpers import CPU_ONLY, load_script, positive

async_save = load_script("async_save")


@CPU_ONLY
def test_both_modes_run_and_the_async_run_saved_in_the_background(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "a.json"
    argv = ["--data-path", tiny_corpus["prefix"], "--tokenizer-model", tiny_corpus["tokenizer"], "--model", "tiny"]
    code = async_save.main([*argv, "--train-iters", "6", "--work-dir", str(tmp_path / "w"), "--output-json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| sync | 1 |" in printed and "| async | 1 |" in printed, printed
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    for row in rows.values():
        # K=4, lambda=2/3: 4 patch + 2 token steps; saves at 2, 4 (the boundary) and 6 (the end)
        assert row["saves"] == 3 and positive(row["steps_s"]) and positive(row["waited_s"]), row
        assert positive(row["wall_s"]) and positive(row["peak_pss_mb"]) and positive(row["save_s_mean"]), row
    assert rows["sync"]["blocked_s"] == [None, None]
    assert all(positive(seconds) for seconds in rows["async"]["blocked_s"]), rows["async"]
    assert (tmp_path / "w" / "async-0" / "iter_0000006").is_dir()


def test_a_failed_run_and_a_bad_flag_are_one_line(tmp_path, capsys):
    code = async_save.main(["--data-path", str(tmp_path / "none"), "--tokenizer-model", str(tmp_path / "none.model")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("error: the sync run failed: ") and "\n" not in error, error
    assert "none.model" in error, error
    code = async_save.main(["--data-path", "d", "--tokenizer-model", "t", "--repeats", "0"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--repeats 0 must be >= 1" in error, error
