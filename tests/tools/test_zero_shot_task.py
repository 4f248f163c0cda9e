"""The shipped zero-shot task (``tiny_next_sentence``) is what tools/build_zero_shot_task.py builds
from the bundled corpus, each item's labelled choice the sentence that follows its passage and no
other; the builder refuses an output it cannot write; the sentence splitter it uses."""

import json
import os

from megatron_patch.evaluation import zero_shot
from megatron_patch.evaluation.next_sentence import split_sentences
from tests.tools.common import call
from tools import build_zero_shot_task

TASK = "tiny_next_sentence"
SHIPPED = os.path.join(zero_shot.TASKS_DIR, TASK, f"{TASK}.jsonl")


def test_the_shipped_task_is_what_its_script_builds(tmp_path, capsys):
    output = tmp_path / "rebuilt.jsonl"
    code, out, err = call(build_zero_shot_task, ["--output", output], capsys)
    assert code == 0, err
    assert output.read_bytes() == open(SHIPPED, "rb").read()
    from megatron_patch.data.inputs import expand_inputs, iter_lines, parse_line

    [corpus] = expand_inputs([build_zero_shot_task.DEFAULT_INPUT])
    documents = [
        " ".join(parse_line(raw, corpus.format, ["text"])["text"].split()) for _, _, raw, _ in iter_lines([corpus])
    ]
    for line in open(SHIPPED):
        item = json.loads(line)
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        # the labelled choice is the sentence that follows the passage in its document; no other is
        assert f"{item['context']} {item['choices'][item['label']]}" in documents[item["document"]], item["id"]
        others = [c for i, c in enumerate(item["choices"]) if i != item["label"]]
        assert not any(f"{item['context']} {c}" in documents[item["document"]] for c in others), item["id"]


def test_the_task_builder_refuses_an_output_it_cannot_write(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    cases = {
        tmp_path / "file" / "task.jsonl": "is a file, not a folder",
        tmp_path / "missing" / "task.jsonl": "does not exist; create it first",
        tmp_path: f"--output {tmp_path} is a folder",
    }
    for output, expected in cases.items():
        code, out, err = call(build_zero_shot_task, ["--output", output], capsys)
        assert code == 2 and len(err) == 1 and expected in err[0], err


def test_a_missing_key_names_this_tool_s_flag(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "One. Two."}\n')
    code, out, err = call(
        build_zero_shot_task, ["--input", corpus, "--json-key", "txt", "--output", tmp_path / "t"], capsys
    )
    assert code == 2 and len(err) == 1, err
    assert f"{corpus}:1: missing key 'txt'" in err[0] and "set --json-key to the key" in err[0], err


def test_sentence_split():
    text = 'Mr. Elliot said "No!"  He left.\nIt was 3 p.m. when Mrs. Smith came? Yes.'
    assert split_sentences(text) == ['Mr. Elliot said "No!"', "He left.", "It was 3 p.m. when Mrs. Smith came?", "Yes."]
