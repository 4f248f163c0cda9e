"""tools/evaluate_zero_shot.py: a checkpoint the tests train, exported and scored by
lm-evaluation-harness on the shipped task, scores differently from a one-step checkpoint; the
harness's log-likelihoods are Megatron's (float64 oracle); a converted patch-stage checkpoint is
reported as patch stage; bad inputs and a failed write of the report are refused with one line.
The shipped task and its builder: test_zero_shot_task.py; the reported metrics: test_zero_shot_metrics.py."""

import json
import os
import shutil
import sys

import pytest
import torch

from megatron_patch.checkpoint.folders import resolve_checkpoint
from megatron_patch.checkpoint.store import read_metadata
from megatron_patch.conversion.hf_folder import PROVENANCE
from megatron_patch.data.tokenizer import SentencePieceTokenizer
from megatron_patch.evaluation import zero_shot
from megatron_patch.training import cli
from tests.tools.common import (
    assert_one_line_error,
    call,
    fill_the_disk_halfway_through_atomic_writes,
    megatron_logits,
    megatron_model,
)
from tests.training.common import trainer_args
from tools import evaluate_zero_shot

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)

TASK = "tiny_next_sentence"
SHIPPED = os.path.join(zero_shot.TASKS_DIR, TASK, f"{TASK}.jsonl")
SEQ = 128  # T of the models here: the task's longest choice is 85 tokens of the tests' 512-piece tokenizer


def _train(tiny_corpus, root, *extra, iters):
    assert (
        cli.main(
            trainer_args(tiny_corpus, root, "--seq-length", str(SEQ), "--eval-iters", "0", *extra, train_iters=iters)
        )
        == 0
    )
    return str(root)


@pytest.fixture(scope="module")
def models(world, tiny_corpus, tmp_path_factory):
    """``{trained, one_step}``: a two-stage run (K=4, lambda=2/3, 24 steps of 16 x 128 tokens) and a
    token-level run of one step at lr 1e-5 (all but untrained), T=128."""
    folder = tmp_path_factory.mktemp("zero_shot")
    return {
        "trained": _train(tiny_corpus, folder / "trained", iters=24),
        "one_step": _train(tiny_corpus, folder / "one_step", "--patch-size", "1", "--lr", "1e-5", iters=1),
    }


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory, world):
    """The one-step model exported once (for the tests of bad inputs, which need a model folder)."""
    from tools import export_hf

    folder = tmp_path_factory.mktemp("exported") / "hf"
    assert export_hf.main(["--cpu", "--load", models["one_step"], "--save", str(folder)]) == 0
    return str(folder)


def _evaluate(checkpoint, output, capsys):
    code, out, err = call(
        evaluate_zero_shot,
        ["--cpu", "--load", checkpoint, "--tasks", TASK, "--batch-size", "32", "--output-json", output],
        capsys,
    )
    assert code == 0, err
    return json.load(open(output)), out


def test_trained_model_scores_differently_from_an_untrained_one(models, tmp_path, capsys):
    items = sum(1 for _ in open(SHIPPED))
    scores = {}
    for name in ("trained", "one_step"):
        report, out = _evaluate(models[name], tmp_path / f"{name}.json", capsys)
        assert report["checkpoint"].startswith(models[name]) and report["stage"] == "token"
        [score] = report["scores"]
        assert score["task"] == TASK and score["metric"] == "acc_mutual_info" and score["items"] == items
        metrics = score["metrics"]
        assert sorted(metrics) == ["acc", "acc_mutual_info", "acc_norm"]
        assert score["value"] == metrics["acc_mutual_info"]
        assert all(0 <= value <= 1 for value in metrics.values()) and 0 < score["stderr"] < 0.1
        assert f"| {TASK} | acc_mutual_info | {100 * score['value']:.1f} |" in out, out
        scores[name] = metrics
    assert scores["trained"] != scores["one_step"], scores
    assert sorted(os.listdir(tmp_path)) == ["one_step.json", "trained.json"]  # no temporary files left


def test_harness_log_likelihoods_match_megatron_in_float64(models, tiny_corpus, tmp_path, capsys):
    """Oracle: each choice's log-likelihood, recomputed from the Megatron checkpoint's logits in
    float64 with the SentencePiece model it was trained on, as the harness defines it (choice
    tokens = tokens of context + " " + choice after the context's; the last T+1 tokens kept), its
    log-likelihood without context (after EOD, as documents start in training), and acc, acc_norm
    and acc_mutual_info (argmax of the sum, of the sum per character, of the difference)."""
    output = tmp_path / "samples.json"
    code, _, err = call(
        evaluate_zero_shot,
        [
            "--cpu",
            "--load",
            models["trained"],
            "--tasks",
            TASK,
            "--limit",
            "6",
            "--log-samples",
            "--output-json",
            output,
        ],
        capsys,
    )
    assert code == 0, err
    report = json.load(open(output))
    items = [json.loads(line) for line in open(SHIPPED)]
    tokenizer = SentencePieceTokenizer(tiny_corpus["tokenizer"])
    rows = read_metadata(resolve_checkpoint(models["trained"]))["model_shape"]["vocab_size"]
    model = megatron_model(models["trained"], vocab=rows, seq=SEQ)
    hits, hits_norm, hits_mutual = [], [], []

    def log_likelihood(prefix, continuation):  # summed log p (nats) of continuation after prefix, float64
        tokens = (prefix + continuation)[-(SEQ + 1) :][:-1]
        logits = megatron_logits(model, torch.tensor([tokens]))[0].double()  # [s, rows]
        log_probs = torch.log_softmax(logits, dim=-1)[-len(continuation) :]  # the choice's positions
        return log_probs.gather(1, torch.tensor(continuation)[:, None]).sum().item()

    assert [sample["doc_id"] for sample in report["samples"]] == list(range(6))
    for sample in report["samples"]:
        item = items[sample["doc_id"]]
        assert sample["id"] == item["id"] and sample["target"] == item["label"]
        context = tokenizer.tokenize(item["context"])
        oracle = [
            log_likelihood(context, tokenizer.tokenize(f"{item['context']} {choice}")[len(context) :])
            for choice in item["choices"]
        ]
        # without context: " " + choice after EOD (SentencePiece's dummy prefix is the space)
        unconditional = [log_likelihood([tokenizer.eod], tokenizer.tokenize(choice)) for choice in item["choices"]]
        assert sample["loglikelihoods"] == pytest.approx(oracle + unconditional, rel=1e-5, abs=1e-3), item["id"]
        lengths = [len(choice) for choice in item["choices"]]
        hits.append(max(range(4), key=lambda i: oracle[i]) == item["label"])
        hits_norm.append(max(range(4), key=lambda i: oracle[i] / lengths[i]) == item["label"])
        hits_mutual.append(max(range(4), key=lambda i: oracle[i] - unconditional[i]) == item["label"])
    [score] = report["scores"]
    assert score["items"] == 6
    assert score["metrics"] == pytest.approx(
        {"acc": sum(hits) / 6, "acc_norm": sum(hits_norm) / 6, "acc_mutual_info": sum(hits_mutual) / 6}
    )


GROUP = """group: tiny_group
task:
  - group: tiny_inner
    task: [tiny_next_sentence]
    aggregate_metric_list: [{metric: acc_norm, weight_by_size: true}]
aggregate_metric_list: [{metric: acc_norm, weight_by_size: true}, {metric: acc, weight_by_size: true}]
"""


def test_a_group_from_an_include_path(exported, tmp_path, capsys):
    """A group (as MMLU is one) from an --include-path folder: its aggregate is reported with the
    items of all its tasks."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_group.yaml").write_text(GROUP)
    output = tmp_path / "group.json"
    code, out, err = call(
        evaluate_zero_shot,
        [
            "--hf-model",
            exported,
            "--include-path",
            folder,
            "--tasks",
            "tiny_group",
            "--limit",
            "5",
            "--output-json",
            output,
        ],
        capsys,
    )
    assert code == 0, err
    report = json.load(open(output))
    [group] = report["scores"]
    assert (group["task"], group["metric"], group["items"]) == ("tiny_group", "acc_norm", 5)
    assert report["average"] is None and f"| tiny_group | acc_norm | {100 * group['value']:.1f} |" in out


def test_bad_inputs_are_one_line(models, tmp_path, capsys, monkeypatch):
    output = tmp_path / "out.json"
    code, _, err = call(
        evaluate_zero_shot,
        ["--cpu", "--load", models["one_step"], "--tasks", "no_such_task", "--output-json", output],
        capsys,
    )
    assert_one_line_error(code, err, "--tasks no_such_task")
    model = tmp_path / "hf"
    model.mkdir()
    code, _, err = call(evaluate_zero_shot, ["--hf-model", model, "--output-json", output], capsys)
    assert_one_line_error(code, err, "holds no config.json")
    (model / "config.json").write_text("{}")  # a model folder without its tokenizer
    code, _, err = call(evaluate_zero_shot, ["--hf-model", model, "--output-json", output], capsys)
    assert_one_line_error(code, err, "holds no tokenizer.model or tokenizer.json")
    (model / "tokenizer.model").write_text("")
    (model / PROVENANCE).write_text('{"source": ')  # a hand-edited export record, cut short
    with monkeypatch.context() as no_evaluation:  # refused before the evaluation, not after its hours
        no_evaluation.setattr(zero_shot, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated"))
        code, _, err = call(evaluate_zero_shot, ["--hf-model", model, "--tasks", TASK, "--output-json", output], capsys)
    assert_one_line_error(code, err, f"{model / PROVENANCE}: not a readable export record")
    (model / PROVENANCE).write_text('{"source": "x", "progress": "token"}')  # a field the report reads as an object
    with monkeypatch.context() as no_evaluation:
        no_evaluation.setattr(zero_shot, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated"))
        code, _, err = call(evaluate_zero_shot, ["--hf-model", model, "--tasks", TASK, "--output-json", output], capsys)
    assert_one_line_error(code, err, "whose progress and conversion are objects")
    shutil.rmtree(model)
    code, _, err = call(evaluate_zero_shot, ["--cpu", "--load", models["one_step"], "--output-json", tmp_path], capsys)
    assert_one_line_error(code, err, "is a folder: name the report file to write")
    load = ["--cpu", "--load", models["one_step"], "--output-json", output]
    code, _, err = call(evaluate_zero_shot, [*load, "--device", "gpu0"], capsys)
    assert_one_line_error(code, err, "--device gpu0 is not a torch device")
    if not torch.cuda.is_available():
        code, _, err = call(evaluate_zero_shot, [*load, "--device", "cuda"], capsys)
        assert_one_line_error(code, err, "this machine has no CUDA device; pass --device cpu")
    with monkeypatch.context() as one_gpu:  # as on a machine of one GPU
        one_gpu.setattr(torch.cuda, "is_available", lambda: True)
        one_gpu.setattr(torch.cuda, "device_count", lambda: 1)
        code, _, err = call(evaluate_zero_shot, [*load, "--device", "cuda:7"], capsys)
    assert_one_line_error(code, err, "--device cuda:7: this machine has CUDA devices cuda:0 to cuda:0")
    code, _, err = call(evaluate_zero_shot, [*load, "--device", "meta"], capsys)
    assert_one_line_error(code, err, "--device meta: the evaluation runs on cpu, cuda or cuda:N")
    code, _, err = call(
        evaluate_zero_shot,
        ["--cpu", "--load", models["one_step"], "--include-path", tmp_path / "nope", "--output-json", output],
        capsys,
    )
    assert_one_line_error(code, err, "--include-path")
    monkeypatch.setenv("WORLD_SIZE", "2")  # started by torchrun
    code, _, err = call(evaluate_zero_shot, ["--cpu", "--load", models["one_step"], "--output-json", output], capsys)
    assert_one_line_error(code, err, "WORLD_SIZE=2")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    code, _, err = call(evaluate_zero_shot, ["--cpu", "--load", models["one_step"], "--output-json", output], capsys)
    assert_one_line_error(code, err, "pip install -e .[eval]")
    assert not os.path.exists(output) and os.listdir(tmp_path) == []


def test_output_json_replaces_nothing_it_reads(trained, tmp_path, capsys):
    """--output-json may not be written into the --load checkpoint or its run, the --hf-model folder,
    or over the --tokenizer-model: one line before the export, every file as it was."""
    run = tmp_path / "run"
    shutil.copytree(trained["final"], run / "iter_0000006")
    (run / "latest_checkpointed_iteration.txt").write_text("6\n")
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    shutil.copy(trained["corpus"]["tokenizer"], model / "tokenizer.model")
    load = ["--cpu", "--load", run, "--tasks", TASK]
    cases = [
        (load, run / "iter_0000006" / "megatron_patch.json", f"is inside --load {run}"),
        (
            ["--cpu", "--load", run / "iter_0000006", "--tasks", TASK],
            run / "latest_checkpointed_iteration.txt",
            f"is inside --load {run}",
        ),
        (["--hf-model", model, "--tasks", TASK], model / "config.json", f"is inside --hf-model {model}"),
        ([*load, "--tokenizer-model", model / "tokenizer.model"], model / "tokenizer.model", "is --tokenizer-model"),
    ]
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for argv, output, expected in cases:
        code, _, err = call(evaluate_zero_shot, [*argv, "--output-json", output], capsys)
        assert_one_line_error(code, err, expected)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_no_checkpoint_verify_reaches_the_export(models, tmp_path, capsys):
    """A checkpoint whose files no longer match its manifest (here its metadata, one byte longer) is
    refused by the export, whose line suggests --no-checkpoint-verify; given, the export loads it."""
    copy = tmp_path / "copy"
    shutil.copytree(models["one_step"], copy)
    metadata = os.path.join(resolve_checkpoint(str(copy)), "megatron_patch.json")
    with open(metadata, "a") as f:
        f.write("\n")
    argv = ["--cpu", "--load", copy, "--tasks", TASK, "--limit", "2", "--output-json", tmp_path / "out.json"]
    code, _, err = call(evaluate_zero_shot, argv, capsys)
    assert_one_line_error(code, err, "pass --no-checkpoint-verify to skip the check")
    code, _, err = call(evaluate_zero_shot, [*argv, "--no-checkpoint-verify"], capsys)
    assert code == 0, err
    assert json.load(open(tmp_path / "out.json"))["scores"][0]["items"] == 2


def test_unreachable_hub_dataset_is_one_line(exported, tmp_path, capsys, monkeypatch):
    """The paper's tasks read the Hub; offline (as on these machines) that is one line, not a traceback."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    output = tmp_path / "out.json"
    code, _, err = call(
        evaluate_zero_shot,
        ["--hf-model", exported, "--tasks", "arc_easy", "--limit", "2", "--output-json", output],
        capsys,
    )
    assert_one_line_error(code, err, "not reachable")
    assert "HF_DATASETS_OFFLINE" in err[0] and "--include-path" in err[0]
    assert not os.path.exists(output)


LONG_CHOICE_TASK = """task: tiny_long_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_a_choice_longer_than_the_model_is_one_line(exported, tmp_path, capsys):
    """The harness stops on an answer choice longer than the model's positions (T=128 here) with a
    bare assertion; the tool names the limit and the way out instead."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    long = " ".join(["the sea was calm and the ship sailed on"] * 40)  # far over 128 tokens
    item = {"context": "It was morning.", "choices": ["Then it rained.", long], "label": 0}
    (folder / "items.jsonl").write_text(json.dumps(item) + "\n")
    (folder / "tiny_long_choice.yaml").write_text(LONG_CHOICE_TASK.format(data=folder / "items.jsonl"))
    output = tmp_path / "out.json"
    code, _, err = call(
        evaluate_zero_shot,
        ["--hf-model", exported, "--include-path", folder, "--tasks", "tiny_long_choice", "--output-json", output],
        capsys,
    )
    # stderr also carries the harness's progress bars, which run until the failing request
    errors = [line[line.index("error: ") :] for line in err if "error: " in line]
    assert code == 2 and len(errors) == 1 and not any("AssertionError" in line for line in err), err
    assert f"longer than the model's {SEQ} positions" in errors[0] and "--seq-length" in errors[0], errors
    assert not os.path.exists(output)


def _short_task(folder):
    """An --include-path folder with a one-item task whose choices fit T=32 (the ``trained`` fixture's)."""
    folder.mkdir()
    item = {"context": "It was morning.", "choices": ["Then it rained.", "The sea was calm."], "label": 0}
    (folder / "items.jsonl").write_text(json.dumps(item) + "\n")
    task = LONG_CHOICE_TASK.replace("tiny_long_choice", "tiny_short_choice")
    (folder / "tiny_short_choice.yaml").write_text(task.format(data=folder / "items.jsonl"))
    return ["--include-path", folder, "--tasks", "tiny_short_choice"]


def test_a_converted_patch_checkpoint_is_reported_as_patch_stage(trained, converted, tmp_path, capsys):
    """tools/convert_checkpoint.py's output says token stage, iteration 0; its weights are the patch
    stage's: the export's provenance says so, and so does the report."""
    output = tmp_path / "out.json"
    argv = ["--cpu", "--load", converted, *_short_task(tmp_path / "tasks"), "--output-json", output]
    code, out, err = call(evaluate_zero_shot, argv, capsys)
    assert code == 0, err
    report = json.load(open(output))
    assert (report["stage"], report["iteration"], report["converted_from"]) == ("patch", 0, trained["patch"])
    assert "(patch stage, iteration 0)" in out


def test_a_failed_write_of_the_report_is_one_line(trained, tmp_path, capsys, monkeypatch):
    """A report that cannot be written (a full disk) names the file and the fix; the half-written
    temporary file is removed."""
    fill_the_disk_halfway_through_atomic_writes(monkeypatch)
    output = tmp_path / "out.json"
    argv = ["--cpu", "--load", trained["final"], *_short_task(tmp_path / "tasks"), "--output-json", output]
    code, out, err = call(evaluate_zero_shot, argv, capsys)
    errors = [line[line.index("error: ") :] for line in err if "error: " in line]  # and the harness's progress bars
    assert code == 2 and len(errors) == 1, err
    assert f"--output-json {output} could not be written (No space left on device)" in errors[0]
    assert not output.exists() and sorted(os.listdir(tmp_path)) == ["tasks"]
