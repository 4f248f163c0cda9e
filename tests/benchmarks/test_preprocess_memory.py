"""benchmarks/preprocess_memory.py end to end on a small generated corpus (two sizes, 2 workers:
two runs of the tool, each a few seconds of imports): the table, the JSON, the figures' internal
consistency and the one-line flag errors. Memory growth is measured by the script, not asserted
here."""

import importlib.util
import json
import random
import sys

import pytest

from tests.conftest import REPO_ROOT


def _load():
    path = REPO_ROOT / "benchmarks" / "preprocess_memory.py"
    spec = importlib.util.spec_from_file_location("benchmarks_preprocess_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


preprocess_memory = _load()


@pytest.fixture
def corpus(tmp_path):
    """60 documents of random words, one of them empty."""
    rng = random.Random(3)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    path = tmp_path / "c.jsonl"
    with open(path, "w") as stream:
        for line in range(60):
            text = "" if line == 7 else " ".join(rng.choice(words) for _ in range(rng.randint(5, 80)))
            stream.write(json.dumps({"text": text}) + "\n")
    return path


def test_memory_table_for_two_sizes(corpus, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = preprocess_memory.main(
        [
            "--input",
            str(corpus),
            "--lines",
            "40",
            "--scales",
            "1",
            "3",
            "--workers",
            "2",
            "--vocab-size",
            "300",
            "--output-json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("python benchmarks/preprocess_memory.py --input")
    assert "| workers | scale | input MB | documents | peak PSS MB |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["workers"], r["scale"]) for r in rows] == [(2, 1), (2, 3)]
    for row in rows:
        assert row["lines"] == 40 * row["scale"]
        assert row["documents"] == 39 * row["scale"]  # line 7 is empty: kept in the index, not a document
        assert row["samples"] >= 1
        assert 0 < row["peak_pss_mb"] <= row["peak_rss_mb"]  # 3 processes: main and 2 workers
        assert row["max_process_rss_mb"] > 0
    assert rows[0]["pss_vs_smallest"] == 1.0
    assert rows[1]["pss_vs_smallest"] == rows[1]["peak_pss_mb"] / rows[0]["peak_pss_mb"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lines", "0"], "--lines 0: every value must be >= 1"),
        (["--workers", "0"], "--workers [0]: every value must be >= 1"),
        (["--lines", "100"], "--lines 100: --input"),
    ],
)
def test_bad_flags_are_one_line_errors(corpus, argv, message, capsys):
    assert preprocess_memory.main(["--input", str(corpus), *argv, "--scales", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
