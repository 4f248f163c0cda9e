"""tools/evaluate.py against a float64 oracle written here from the definition: the token stream
(EOD, each document, EOD), each target scored once in the window that first holds it, fp32 logits
of the model (megatron's GPTModel, called directly), cross-entropy in float64
(tests/reference.py). A converted patch-stage checkpoint is reported as patch stage. Bad inputs
and a failed --output-json write give one-line errors."""

import json
import lzma
import math
import shutil

import pytest
import torch

from tests.reference import reference_per_target_loss
from tests.tools.common import (
    SEQ,
    assert_one_line_error,
    call,
    fill_the_disk_halfway_through_atomic_writes,
    leftovers,
    megatron_logits,
    megatron_model,
    tokenizer_of,
)
from tools import evaluate

TEXTS = [
    "It was the best of times, it was the worst of times.",
    "Émile paid 12 € for 3 croissants — très bien!\nNew line, same document.",
    "",  # skipped, as in preprocessing
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing "
    "to do: once or twice she had peeped into the book her sister was reading, but it had no pictures "
    "or conversations in it.",
]


def _write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def reference(checkpoint, tokenizer_path, texts, seq_length, stride):
    """(loss sum in nats, targets, bytes) by the definition, in float64."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    eod = processor.eos_id()
    stream = [eod]
    for text in texts:
        if text:
            stream += processor.encode(text) + [eod]
    model = megatron_model(checkpoint)
    total, targets = 0.0, len(stream) - 1
    cache = {}
    for t in range(1, targets + 1):  # target x[t], predicted from x[begin:t]
        k = max(0, math.ceil((t - seq_length) / stride))  # the first window (begin k*stride) that holds it
        begin = k * stride
        if k not in cache:
            window = torch.tensor([stream[begin : begin + seq_length]])
            cache[k] = megatron_logits(model, window)[0]  # [s, V]
        logits = cache[k][t - 1 - begin]  # position t-1-begin predicts x[t]
        total += reference_per_target_loss(logits.view(1, 1, -1), torch.tensor([[[stream[t]]]]))[0, 0, 0].item()
    return total, targets, sum(len(text.encode("utf-8")) for text in texts)


@pytest.mark.parametrize(
    "window",
    [["--window", "non-overlapping"], ["--window", "sliding", "--stride", "12"]],
    ids=["non-overlapping", "sliding"],
)
def test_loss_equals_float64_reference(trained, tmp_path, capsys, window):
    data = _write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    output = tmp_path / "result.json"
    code, out, err = call(
        evaluate,
        [
            "--cpu",
            "--load",
            trained["final"],
            "--input",
            data,
            "--output-json",
            output,
            "--micro-batch-size",
            "3",
            *window,
        ],
        capsys,
    )
    assert code == 0, err
    result = json.load(open(output))
    stride = 12 if "sliding" in window else SEQ
    loss_sum, targets, text_bytes = reference(trained["final"], trained["corpus"]["tokenizer"], TEXTS, SEQ, stride)
    assert result["tokens"] == targets and result["documents"] == 3 and result["bytes"] == text_bytes
    assert result["empty_documents_skipped"] == 1
    assert result["window"] == window[1] and result["stride"] == stride
    assert abs(result["loss"] - loss_sum / targets) <= 1e-6 * loss_sum / targets
    assert result["perplexity"] == pytest.approx(math.exp(loss_sum / targets), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(loss_sum / math.log(2) / text_bytes, rel=1e-6)
    assert window[1] in out and f"loss {result['loss']:.4f}" in out
    assert not leftovers(tmp_path)


def test_prefix_and_jsonl_of_the_same_documents_agree(trained, tiny_jsonl, tmp_path, capsys):
    with lzma.open(tiny_jsonl, "rt", encoding="utf-8") as f:
        first = [json.loads(next(f))["text"] for _ in range(2)]
    data = _write_jsonl(tmp_path / "first.jsonl", first)
    results = []
    for source in (["--input", data], ["--data-path", trained["corpus"]["prefix"], "--max-documents", "2"]):
        output = tmp_path / "r.json"
        code, _, err = call(
            evaluate,
            ["--cpu", "--load", trained["root"], *source, "--output-json", output, "--micro-batch-size", "8"],
            capsys,
        )
        assert code == 0, err
        results.append(json.load(open(output)))
    jsonl, prefix = results
    assert jsonl["tokens"] == prefix["tokens"] and jsonl["documents"] == prefix["documents"] == 2
    assert jsonl["loss_sum_nats"] == pytest.approx(prefix["loss_sum_nats"], rel=1e-12)
    assert jsonl["bytes"] == prefix["bytes"]  # detokenizing gives the text back


def test_max_documents_counts_empty_ones_in_files_as_in_a_prefix(trained, tiny_jsonl, tmp_path, capsys):
    """The prefix counts its index entries, empty documents included; --input now counts lines the
    same way (it counted non-empty documents only)."""
    with lzma.open(tiny_jsonl, "rt", encoding="utf-8") as f:
        first = [json.loads(next(f))["text"] for _ in range(3)]
    data = _write_jsonl(tmp_path / "gap.jsonl", [first[0], "", first[1], first[2]])
    output = tmp_path / "r.json"
    argv = ["--cpu", "--load", trained["root"], "--input", data, "--max-documents", "3", "--output-json", output]
    code, _, err = call(evaluate, argv, capsys)
    assert code == 0, err
    assert json.load(open(output))["documents"] == 2  # lines 1 and 3; line 2 is empty


def test_several_checkpoints_in_one_call_equal_one_call_each(trained, tmp_path, capsys):
    """--load A B with one --output-json each: one model build, the weights of each loaded in turn,
    the same results (bit for bit) as a call per checkpoint."""
    data = _write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    checkpoints = [trained["patch"], trained["final"]]
    together = [tmp_path / "patch.json", tmp_path / "final.json"]
    code, out, err = call(
        evaluate, ["--cpu", "--load", *checkpoints, "--input", data, "--output-json", *together], capsys
    )
    assert code == 0, err
    assert out.count("checkpoint: ") == 2 and all(f"wrote {path}" in out for path in together)
    for checkpoint, output in zip(checkpoints, together):
        alone = tmp_path / "alone.json"
        code, _, err = call(evaluate, ["--cpu", "--load", checkpoint, "--input", data, "--output-json", alone], capsys)
        assert code == 0, err
        expected, got = json.load(open(alone)), json.load(open(output))
        assert got["checkpoint"] == checkpoint and got["loss_sum_nats"] == expected["loss_sum_nats"]
        assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in expected.items() if k != "seconds"}
    first, second = (json.load(open(path)) for path in together)
    assert first["stage"] == "patch" and second["stage"] == "token" and first["loss"] != second["loss"]
    table = out[out.index("\ncheckpoint ") :].splitlines()[2:]  # the closing comparison, one row each
    assert [row.split()[:4] for row in table] == [
        [result["checkpoint"][-60:], result["stage"], str(result["iteration"]), f"{result['loss']:.4f}"]
        for result in (first, second)
    ]


def _with_other_length(trained, folder):
    """A copy of the final checkpoint whose metadata says it was trained at T=64 (another model to
    build than the original's T=32), for the several-checkpoints error."""
    copy = folder / "other_length"
    shutil.copytree(trained["final"], copy)
    meta = json.loads((copy / "megatron_patch.json").read_text())
    meta["args"]["seq_length"] = 2 * SEQ
    (copy / "megatron_patch.json").write_text(json.dumps(meta))
    return copy


BAD = {
    "missing-checkpoint": (lambda t, p, o: ["--load", p / "nowhere", "--input", p / "d.jsonl"], "no such directory"),
    "missing-data": (lambda t, p, o: ["--load", t["final"], "--data-path", p / "nothing"], "data prefix"),
    "bad-jsonl": (lambda t, p, o: ["--load", t["final"], "--input", p / "broken.jsonl"], "broken.jsonl, line 2"),
    "tokenizer-size": (
        lambda t, p, o: ["--load", t["final"], "--input", p / "d.jsonl", "--tokenizer-model", tokenizer_of(p, o, 700)],
        "has 700 pieces (padded: 768) but checkpoint",
    ),
    "tokenizer-pieces": (
        lambda t, p, o: ["--load", t["final"], "--input", p / "d.jsonl", "--tokenizer-model", tokenizer_of(p, o, 512)],
        "another vocabulary",
    ),
    "stride-without-sliding": (
        lambda t, p, o: ["--load", t["final"], "--input", p / "d.jsonl", "--stride", "4"],
        "--stride 4 needs --window sliding",
    ),
    "tp-heads": (
        lambda t, p, o: ["--load", t["final"], "--input", p / "d.jsonl", "--tensor-model-parallel-size", "3"],
        "does not divide the 4 attention heads",
    ),
    "outputs-per-checkpoint": (
        lambda t, p, o: ["--load", t["patch"], t["final"], "--input", p / "d.jsonl"],
        "--output-json: 1 file(s) for 2 --load checkpoint(s); give one per checkpoint",
    ),
    "two-models-in-one-call": (
        lambda t, p, o: [
            *("--load", t["final"], _with_other_length(t, p), "--input", p / "d.jsonl"),
            *("--output-json", p / "final.json", p / "other.json"),  # one each (replaces the test's one)
        ],
        f"its model (preset tiny, T={2 * SEQ}, 576 vocabulary rows, fp32) is not",
    ),
    "other-shape": (
        lambda t, p, o: ["--load", t["final"], "--input", p / "d.jsonl", "--model", "cpu-small"],
        "another model shape",
    ),
    "seq-length-zero": (  # it meant the checkpoint's T
        lambda t, p, o: ["--load", t["final"], "--input", p / "d.jsonl", "--seq-length", "0"],
        "--seq-length 0 must be >= 1",
    ),
    "json-keys-with-a-prefix": (  # it was ignored
        lambda t, p, o: ["--load", t["final"], "--data-path", t["corpus"]["prefix"], "--json-keys", "body"],
        "--json-keys names the text of --input files",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(trained, tmp_path, capsys, other_texts, case):
    _write_jsonl(tmp_path / "d.jsonl", TEXTS)
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    make_argv, expected = BAD[case]
    output = tmp_path / "out.json"
    argv = ["--cpu", "--output-json", output, *make_argv(trained, tmp_path, other_texts)]
    code, _, err = call(evaluate, argv, capsys)
    assert_one_line_error(code, err, expected)
    assert not output.exists() and not leftovers(tmp_path)


def test_output_json_replaces_nothing_it_reads(trained, tmp_path, capsys):
    """--output-json may not be written into a --load checkpoint or root, over a data, input or
    tokenizer file, or be a folder: one line before any work, every file as it was."""
    run = tmp_path / "run"
    shutil.copytree(trained["final"], run / "iter_0000006")
    (run / "latest_checkpointed_iteration.txt").write_text("6\n")
    for extension in (".bin", ".idx"):
        shutil.copy(trained["corpus"]["prefix"] + extension, tmp_path / f"corpus{extension}")
    shutil.copy(trained["corpus"]["tokenizer"], tmp_path / "tok.model")
    data = _write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    checkpoint = run / "iter_0000006"
    cases = [
        (["--load", checkpoint, "--input", data], checkpoint / "megatron_patch.json", f"is inside --load {checkpoint}"),
        (["--load", run, "--input", data], run / "results.json", f"is inside --load {run}"),
        (["--load", checkpoint, "--input", data], run / "latest_checkpointed_iteration.txt", f"is inside --load {run}"),
        (["--load", checkpoint, "--input", data], data, f"is --input {data}"),
        (["--load", checkpoint, "--data-path", tmp_path / "corpus"], tmp_path / "corpus.idx", "is --data-path"),
        (
            ["--load", checkpoint, "--input", data, "--tokenizer-model", tmp_path / "tok.model"],
            tmp_path / "tok.model",
            "is --tokenizer-model",
        ),
        (["--load", checkpoint, "--input", data], tmp_path, "is a folder: name the report file to write"),
    ]
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for argv, output, expected in cases:
        code, out, err = call(evaluate, ["--cpu", *argv, "--output-json", output], capsys)
        assert_one_line_error(code, err, expected)
        assert out == ""  # refused before the evaluation
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_a_corrupt_later_checkpoint_is_found_before_the_first_is_evaluated(trained, tmp_path, capsys, monkeypatch):
    """... and before the corpus is tokenized (minutes for a large one)."""
    from megatron_patch.evaluation import token_stream

    tokenized = []
    monkeypatch.setattr(token_stream, "corpus_from_files", lambda *args: tokenized.append(args))
    copy = tmp_path / "corrupt"
    shutil.copytree(trained["final"], copy)
    shard = next(copy.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    data = _write_jsonl(tmp_path / "eval.jsonl", TEXTS)
    outputs = [tmp_path / "first.json", tmp_path / "second.json"]
    argv = ["--cpu", "--load", trained["patch"], copy, "--input", data, "--output-json", *outputs]
    code, out, err = call(evaluate, argv, capsys)
    assert_one_line_error(code, err, "manifest.json says")
    assert str(copy) in err[0] and out == "" and tokenized == []  # the first checkpoint was not evaluated
    assert not any(path.exists() for path in outputs) and not leftovers(tmp_path)


def test_a_converted_patch_checkpoint_is_reported_as_patch_stage(trained, converted, tmp_path, capsys):
    """tools/convert_checkpoint.py's output says token stage, iteration 0; its weights are the patch
    stage's, and score as the patch-stage checkpoint does."""
    data = _write_jsonl(tmp_path / "eval.jsonl", TEXTS[:2])
    outputs = [tmp_path / "converted.json", tmp_path / "patch.json"]
    argv = ["--cpu", "--load", converted, trained["patch"], "--input", data, "--output-json", *outputs]
    code, out, err = call(evaluate, argv, capsys)
    assert code == 0, err
    converted_report, patch_report = (json.load(open(path)) for path in outputs)
    assert converted_report["stage"] == "patch" and converted_report["iteration"] == 0
    assert converted_report["converted_from"] == trained["patch"] and patch_report["converted_from"] is None
    assert converted_report["loss_sum_nats"] == patch_report["loss_sum_nats"]
    assert f"(patch stage, iteration 0, model tiny, converted from {trained['patch']})" in out
    table = out[out.index("\ncheckpoint ") :].splitlines()[2:]
    assert [row.split()[1:3] for row in table] == [["patch", "0"], ["patch", "4"]]


def test_a_failed_output_json_write_is_one_line_and_leaves_the_old_file(trained, tmp_path, capsys, monkeypatch):
    """A report that cannot be written (a full disk) names the file and the fix; the half-written
    temporary file is removed and an earlier report is left as it was."""
    fill_the_disk_halfway_through_atomic_writes(monkeypatch)
    data = _write_jsonl(tmp_path / "eval.jsonl", TEXTS[:2])
    output = tmp_path / "out.json"
    output.write_text('{"earlier": true}\n')
    argv = ["--cpu", "--load", trained["final"], "--input", data, "--output-json", output]
    code, out, err = call(evaluate, argv, capsys)
    assert_one_line_error(code, err, f"--output-json {output} could not be written (No space left on device)")
    assert "check the free space" in err[0] and f"wrote {output}" not in out
    assert output.read_text() == '{"earlier": true}\n' and not leftovers(tmp_path)
