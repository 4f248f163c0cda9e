"""Which metric tools/evaluate_zero_shot.py reports when a task's results are keyed by filters other
than ``none`` (gsm8k's ``exact_match,strict-match`` and ``exact_match,flexible-extract``): the
metric is chosen with its filter, every filter's value is kept under its own name, the table and
the average of several tasks work; a task with no numeric metric is one line; the paper's tasks
and their metrics are the default. Harness-style result dicts through the module's functions, and
one run of the tool on the tiny model."""

import json

import pytest

from megatron_patch.errors import ArgumentError
from megatron_patch.evaluation import zero_shot
from tests.tools.common import assert_one_line_error, call
from tools import evaluate_zero_shot

GSM8K = {  # as lm-evaluation-harness 0.4 returns it (gsm8k.yaml's filter_list: strict-match, flexible-extract)
    "alias": "gsm8k",
    "exact_match,strict-match": 0.25,
    "exact_match_stderr,strict-match": 0.05,
    "exact_match,flexible-extract": 0.625,
    "exact_match_stderr,flexible-extract": 0.0625,
}
PIQA = {"alias": "piqa", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75, "acc_norm_stderr,none": "N/A"}


def test_metric_and_filter_are_chosen_together():
    assert zero_shot.metric_for("gsm8k", GSM8K) == "exact_match,strict-match"  # the task's first filter
    flexible_first = {key: GSM8K[key] for key in sorted(GSM8K)}  # the harness's order decides, not the names
    assert zero_shot.metric_for("gsm8k", flexible_first) == "exact_match,flexible-extract"
    assert zero_shot.metric_for("gsm8k", {**GSM8K, "exact_match,none": 0.5}) == "exact_match"  # none first
    # the preferred metric under a filter beats another metric without one
    assert zero_shot.metric_for("other", {"f1,none": 0.5, "acc_norm,custom": 0.25}) == "acc_norm,custom"
    assert zero_shot.metric_for("piqa", PIQA) == "acc_norm" and zero_shot.metric_for("winogrande", PIQA) == "acc"


def test_several_tasks_under_filters_make_a_report_and_a_table():
    output = {
        "results": {"gsm8k": {**GSM8K, "sample_len": 8}, "piqa": PIQA},
        "n-samples": {"piqa": {"original": 1838, "effective": 5}},
    }
    report = zero_shot.score_results(["gsm8k", "piqa"], output)
    gsm8k, piqa = report["scores"]
    assert gsm8k == {
        "task": "gsm8k",
        "metric": "exact_match,strict-match",
        "value": 0.25,
        "stderr": 0.05,
        "items": 8,
        "metrics": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.625},
    }
    assert piqa == {
        "task": "piqa",
        "metric": "acc_norm",
        "value": 0.75,
        "stderr": None,  # the harness's "N/A"
        "items": 5,
        "metrics": {"acc": 0.5, "acc_norm": 0.75},
    }
    assert report["average"] == 0.5
    json.dumps(report)  # the tool writes it as JSON
    assert zero_shot.table(report).splitlines()[2:] == [
        "| gsm8k | exact_match,strict-match | 25.0 | 5.0 | 8 |",
        "| piqa | acc_norm | 75.0 |  | 5 |",
        "| average | | 50.0 | | |",
    ]


@pytest.mark.parametrize(
    "result", [{"alias": "tiny_group", " ": " "}, {"acc_stderr,none": 0.1, "sample_len": 4}, {"acc,none": "N/A"}, None]
)
def test_a_task_without_a_numeric_metric_is_one_line(result):
    with pytest.raises(ArgumentError) as error:
        zero_shot.score_results(["tiny_group"], {"results": {"tiny_group": result} if result else {}})
    message = str(error.value)
    assert message.startswith("--tasks tiny_group: lm-evaluation-harness computed no numeric metric") and (
        "\n" not in message
    )


ITEMS = [  # short enough for the tiny model's 32 positions
    {
        "context": "It was the best of times, it was the",
        "choices": ["worst.", "red door.", "a cat."],
        "label": 0,
    },
    {"context": "Alice was beginning to get very", "choices": ["tired.", "green.", "seven."], "label": 0},
    {"context": "The sun rose over the", "choices": ["hills.", "spoon.", "Tuesday."], "label": 0},
    {"context": "She opened the door and", "choices": ["walked in.", "blue.", "of the."], "label": 0},
]
SHORT = """task: tiny_short
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""
FILTERED = """include: tiny_short.yaml
task: tiny_filtered
filter_list:
  - name: first
    filter: [{function: take_first}]
  - name: again
    filter: [{function: take_first}]
"""
UNSCORED_GROUP = "group: tiny_unscored\ntask: [tiny_short]\n"  # no aggregate_metric_list


def _tasks(folder, *extra):
    """A folder of task YAML files: ``tiny_short`` (over :data:`ITEMS`) and ``extra`` (name, text)."""
    folder.mkdir()
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (folder / "tiny_short.yaml").write_text(SHORT.format(data=data))
    for name, text in extra:
        (folder / f"{name}.yaml").write_text(text)
    return folder


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The tests' tiny model (T=32), exported once."""
    from tools import export_hf

    pytest.importorskip("lm_eval")
    folder = tmp_path_factory.mktemp("exported") / "hf"
    assert export_hf.main(["--cpu", "--load", trained["final"], "--save", str(folder)]) == 0
    return str(folder)


def _run(exported, folder, tasks, output, capsys):
    argv = ["--hf-model", exported, "--include-path", folder, "--tasks", *tasks]
    return call(evaluate_zero_shot, [*argv, "--output-json", output], capsys)


def test_the_tool_reports_a_filtered_task_beside_another(exported, tmp_path, capsys):
    folder = _tasks(tmp_path / "tasks", ("tiny_filtered", FILTERED))
    output = tmp_path / "out.json"
    code, out, err = _run(exported, folder, ["tiny_filtered", "tiny_short"], output, capsys)
    assert code == 0, err
    report = json.loads(output.read_text())
    filtered, plain = report["scores"]
    assert filtered["metric"] == "acc_norm,first" and plain["metric"] == "acc_norm"
    assert sorted(plain["metrics"]) == ["acc", "acc_norm"]
    assert sorted(filtered["metrics"]) == ["acc,again", "acc,first", "acc_norm,again", "acc_norm,first"]
    for metric, value in plain["metrics"].items():  # both filters take the same response: the same scores
        assert filtered["metrics"][f"{metric},first"] == filtered["metrics"][f"{metric},again"] == value
    assert filtered["value"] == plain["value"] and filtered["items"] == plain["items"] == len(ITEMS)
    assert filtered["stderr"] == plain["stderr"] and plain["stderr"] is not None
    assert report["average"] == pytest.approx(plain["value"])
    assert f"| tiny_filtered | acc_norm,first | {100 * filtered['value']:.1f} |" in out, out


def test_the_tool_refuses_a_group_without_a_metric(exported, tmp_path, capsys):
    folder = _tasks(tmp_path / "tasks", ("tiny_unscored", UNSCORED_GROUP))
    output = tmp_path / "out.json"
    code, _, err = _run(exported, folder, ["tiny_unscored"], output, capsys)
    # the harness's progress bars share stderr; the error is one line, without a traceback
    errors = [line for line in err if line.startswith("error: ")]
    assert_one_line_error(code, errors, "--tasks tiny_unscored: lm-evaluation-harness computed no numeric metric")
    assert err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    assert "aggregate_metric_list" in errors[0] and not output.exists()


def test_reported_metric_and_table():
    mmlu = {"acc,none": 0.25, "acc_stderr,none": 0.01, "alias": "mmlu"}
    assert zero_shot.metric_for("mmlu", mmlu) == "acc"
    both = {"acc,none": 0.5, "acc_norm,none": 0.625, "acc_stderr,none": 0.1, "acc_norm_stderr,none": 0.1}
    assert zero_shot.metric_for("piqa", both) == "acc_norm" and zero_shot.metric_for("other", both) == "acc_norm"
    assert zero_shot.metric_for("winogrande", both) == "acc"  # the paper's table reports acc there
    assert zero_shot.metric_for("gen", {"exact_match,none": 0.5, "exact_match_stderr,none": 0.1}) == "exact_match"
    report = {
        "scores": [
            {"task": "a", "metric": "acc", "value": 0.25, "stderr": 0.0125, "items": 8},
            {"task": "b", "metric": "acc_norm", "value": 0.5, "stderr": None, "items": None},
        ],
        "average": 0.375,
    }
    assert zero_shot.table(report).splitlines()[2:] == [
        "| a | acc | 25.0 | 1.2 | 8 |",
        "| b | acc_norm | 50.0 |  |  |",
        "| average | | 37.5 | | |",
    ]


def test_paper_tasks_are_the_default():
    parser = evaluate_zero_shot.build_parser()
    args = parser.parse_args(["--load", "x", "--output-json", "y"])
    assert args.tasks == ["mmlu", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge"]
    assert [zero_shot.PAPER_TASKS[t] for t in args.tasks] == [
        "acc",
        "acc_norm",
        "acc_norm",
        "acc",
        "acc_norm",
        "acc_norm",
    ]
