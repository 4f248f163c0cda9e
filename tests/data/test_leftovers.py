"""The staging folder of a data tool killed outright (kill -9) is removed by the next run that
completes; a live run's staging folder, and one without an owner file, are left alone."""

import os

from megatron_patch.runtime.owned_temp import OwnedTempDir, remove_abandoned
from tests.data.conftest import write_jsonl
from tests.leftover_helpers import killed_owner_folder


def test_a_completed_preprocess_removes_a_killed_runs_staging_folder(tmp_path, tiny_records, tokenizer_model, tools):
    out = tmp_path / "out"
    out.mkdir()
    killed = killed_owner_folder(out, ".preprocess-", ".tmp")
    live = OwnedTempDir(str(out), ".preprocess-", ".tmp")  # a second run, still working
    unowned = out / ".preprocess-unowned.tmp"
    unowned.mkdir()
    corpus = write_jsonl(tmp_path / "in.jsonl", tiny_records[:5])
    code = tools.preprocess_data.main(
        ["--input", str(corpus), "--tokenizer-model", str(tokenizer_model), "--output-prefix", str(out / "c")]
    )
    assert code == 0
    assert not os.path.exists(killed)
    assert os.path.isdir(live.path) and unowned.is_dir()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "c_text_document.bin",
        "c_text_document.idx",
    ]
    live.release()  # its owner has gone: now it is abandoned too
    assert remove_abandoned(str(out), ".preprocess-", ".tmp") == [live.path]


def test_a_failed_run_removes_nothing_of_others(tmp_path, tokenizer_model, tools):
    out = tmp_path / "out"
    out.mkdir()
    killed = killed_owner_folder(out, ".preprocess-", ".tmp")
    code = tools.preprocess_data.main(
        [
            "--input",
            str(tmp_path / "absent.jsonl"),
            "--tokenizer-model",
            str(tokenizer_model),
            "--output-prefix",
            str(out / "c"),
        ]
    )
    assert code == 2
    assert os.path.isdir(killed)  # only a run that completes cleans up


def test_only_folders_of_the_same_tool_are_judged(tmp_path):
    other = killed_owner_folder(tmp_path, ".merge_datasets-", ".tmp")
    mine = killed_owner_folder(tmp_path, ".preprocess-", ".tmp")
    assert remove_abandoned(str(tmp_path), ".preprocess-", ".tmp") == [mine]
    assert os.path.isdir(other)
