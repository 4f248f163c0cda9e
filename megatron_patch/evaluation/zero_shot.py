"""Zero-shot accuracy of a Hugging Face export with lm-evaluation-harness (``pip install -e .[eval]``).

The paper (Shao, Meng, Zhou 2024, Table 1) reports zero-shot accuracy on six tasks, run with
lm-evaluation-harness; :data:`PAPER_TASKS` names them as the harness does and the metric each is
reported in here. The paper calls all six "normalized accuracy"; the harness has a
length-normalised accuracy (``acc_norm``: each choice's log-likelihood divided by its length in
characters) only for HellaSwag, PIQA, ARC-Easy and ARC-Challenge. MMLU's choices are the single
letters A-D (normalising changes nothing) and WinoGrande scores one shared suffix after two
prefixes, so both report plain ``acc``.

The harness loads the export with ``transformers`` (its ``hf`` model, ``HFLM``) and scores each
choice of a multiple-choice item by its summed log-likelihood after the item's context. The
harness ships task definitions only: it downloads each task's data set from the Hugging Face Hub
on first use (or reads it from the Hugging Face cache); :data:`TASKS_DIR` holds the project's own
task over local files, ``tiny_next_sentence``, for machines without that access.
"""

import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from megatron_patch.conversion.hf_folder import is_export
from megatron_patch.errors import ArgumentError, DataError, UserError

logger = logging.getLogger(__name__)

PAPER_TASKS: Dict[str, str] = {
    "mmlu": "acc",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
}
"""The paper's six zero-shot tasks (harness names, Table 1's column order) -> the metric reported."""

REPORTED_METRICS: Dict[str, str] = {**PAPER_TASKS, "tiny_next_sentence": "acc_mutual_info"}
"""The metric reported per task: the paper's; for the shipped task, accuracy by pointwise mutual
information (each choice's log-likelihood after the context minus its log-likelihood at the start
of a document), which measures the use of the context that small models' plain likelihoods hide."""

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
"""Task definitions shipped with the project, always added to the harness's own."""

INSTALL_HINT = "pip install -e .[eval]"


@dataclass(frozen=True)
class TaskScore:
    """One task's result. Accuracies are fractions of the items (0-1); ``items`` is the number of
    items scored (fewer than the task's with ``limit``); ``metrics`` holds every metric the harness
    computed, ``value`` the reported one, named ``metric``. A metric's name is the harness's for the
    filter ``none`` (``acc``, ``acc_norm``, ...) and carries its filter otherwise
    (``exact_match,strict-match``)."""

    task: str
    metric: str
    value: float
    stderr: Optional[float]
    items: Optional[int]
    metrics: Dict[str, float]


def import_harness():
    """The ``lm_eval`` module with its Hugging Face model class importable; one line otherwise."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (needs accelerate: the harness's [hf] extra)
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"zero-shot evaluation needs lm-evaluation-harness with its Hugging Face model "
            f"({error.name or error} is not installed): run '{INSTALL_HINT}'"
        ) from None
    return lm_eval


_MANAGERS: Dict[tuple, object] = {}  # (task folders, with the harness's own tasks) -> TaskManager


def _manager(paths: tuple, defaults: bool):
    """A TaskManager over ``paths`` (and the harness's ~15,000 own task files when ``defaults``;
    indexing those takes seconds, so each index is built once per process)."""
    if (paths, defaults) not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[paths, defaults] = TaskManager(include_path=list(paths), include_defaults=defaults)
    return _MANAGERS[paths, defaults]


def task_manager(tasks: Sequence[str], include_paths: Sequence[str] = ()):
    """A harness TaskManager that knows every name of ``tasks``: over :data:`TASKS_DIR` and
    ``include_paths`` (folders of task YAML files, e.g. local copies of the paper's tasks) alone
    when they hold all of them, else over the harness's own tasks as well. ArgumentError for a
    folder that does not exist or a name no index knows."""
    for path in include_paths:
        if not os.path.isdir(path):
            raise ArgumentError(f"--include-path {path} is not a folder: pass a folder holding task YAML files")
    import_harness()
    paths = (TASKS_DIR, *[os.path.abspath(p) for p in include_paths])
    local = _manager(paths, False)
    if set(tasks) <= set(local.all_tasks):
        return local
    manager = _manager(paths, True)
    check_task_names(manager, tasks)
    return manager


def check_task_names(manager, tasks: Sequence[str]) -> None:
    """ArgumentError naming the first task (or group) the harness does not know."""
    import lm_eval

    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            raise ArgumentError(
                f"--tasks {name}: lm-evaluation-harness {lm_eval.__version__} knows no task or group of that "
                f"name; 'lm-eval ls tasks' lists them, and a task of your own goes in a folder passed with "
                f"--include-path"
            )


def _offline_error(error: Exception) -> DataError:
    offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
    why = (
        "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and it is not in the local cache"
        if offline
        else "this machine cannot reach the Hugging Face Hub"
    )
    return DataError(
        f"a task's data set is not reachable: {error} ({why}); run the same command once on a machine with "
        f"network access, copy its Hugging Face cache (HF_HOME, default ~/.cache/huggingface) here and set "
        f"HF_DATASETS_OFFLINE=1, or point a task YAML at local files and pass its folder with --include-path"
    )


def _is_unreachable(error: Exception) -> bool:
    """A data set that could not be fetched (datasets raises ConnectionError; huggingface_hub its
    own offline/not-in-cache errors)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, ConnectionError) or bool(
        names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError"}
    )


def _is_choice_too_long(error: Exception) -> bool:
    """The harness's ``hf`` model asserts that each choice (the continuation it scores) fits the
    model's positions; the assertion has no message, so it is known by its source line."""
    frames = traceback.extract_tb(error.__traceback__) if isinstance(error, AssertionError) else []
    line = (frames[-1].line or "") if frames else ""
    return "continuation_enc" in line and "max_length" in line


def _choice_too_long_error(hf_folder: str, harness_version: str) -> DataError:
    with open(os.path.join(hf_folder, "config.json"), encoding="utf-8") as f:
        positions = json.load(f).get("max_position_embeddings")
    return DataError(
        f"a task's answer choice is longer than the model's {positions} positions (lm-evaluation-harness "
        f"{harness_version} scores each choice whole and stops there): leave that task out, or evaluate a "
        f"model trained with a longer --seq-length"
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_keys(result: dict) -> Dict[str, str]:
    """``{name: harness key}`` of the numeric metrics of one task's result (standard errors left
    out), in the harness's order. The harness keys a value by metric and filter (``acc,none``,
    ``exact_match,strict-match``); the name is the metric alone for the filter ``none`` (``acc``),
    else the harness's key (``exact_match,strict-match``), so that no two filters share a name."""
    keys = {}
    for key, found in result.items():
        metric, _, filter_name = key.partition(",")
        if filter_name and not metric.endswith("_stderr") and _is_number(found):
            keys[metric if filter_name == "none" else key] = key
    return keys


def metric_for(task: str, result: dict) -> str:
    """The name of the metric reported for ``task`` (see :func:`_metric_keys`). The metric:
    :data:`REPORTED_METRICS`' choice, else ``acc_norm`` where the harness computed it, else ``acc``,
    else the first by name. Its filter: ``none`` where the harness computed the metric without a
    filter, else the first filter the task defines (the harness keeps the order of the task's
    ``filter_list``: gsm8k's ``strict-match`` before ``flexible-extract``). ArgumentError when the
    result holds no numeric metric."""
    keys = _metric_keys(result)
    if not keys:
        raise ArgumentError(
            f"--tasks {task}: lm-evaluation-harness computed no numeric metric for it (its result holds "
            f"{', '.join(sorted(result)) or 'nothing'}); pass a task that computes one, or a group with an "
            f"aggregate_metric_list"
        )
    names: Dict[str, List[str]] = {}  # metric -> its names, one per filter, in the harness's order
    for name, key in keys.items():
        names.setdefault(key.partition(",")[0], []).append(name)
    metric = next(m for m in (REPORTED_METRICS.get(task), "acc_norm", "acc", min(names)) if m in names)
    return metric if metric in names[metric] else names[metric][0]


def task_score(task: str, result: dict, items: Optional[int] = None) -> TaskScore:
    """One task's :class:`TaskScore` from its entry of the harness's ``results`` (``{"acc,none":
    0.5, "acc_stderr,none": 0.02, ...}``): the reported metric (:func:`metric_for`), its value and
    standard error (None where the harness has none, e.g. ``"N/A"``), and every numeric metric
    under its name (filter included where it is not ``none``)."""
    keys = _metric_keys(result)
    metric = metric_for(task, result)
    name, _, filter_name = keys[metric].partition(",")
    stderr = result.get(f"{name}_stderr,{filter_name}")
    return TaskScore(
        task,
        metric,
        float(result[keys[metric]]),
        float(stderr) if _is_number(stderr) else None,
        items,
        {each: float(result[key]) for each, key in keys.items()},
    )


def score_results(tasks: Sequence[str], output: dict) -> dict:
    """``{"scores": [TaskScore dict per task], "average": mean of the reported values (None for one
    task)}`` from the output of the harness's ``simple_evaluate`` (its ``results`` and
    ``n-samples``); a group's result counts the items of all its tasks in ``sample_len``."""
    results, counts = output["results"], output.get("n-samples", {})
    scores = []
    for task in tasks:
        result = results.get(task, {})  # a group without aggregate_metric_list may be left out
        scores.append(task_score(task, result, result.get("sample_len", counts.get(task, {}).get("effective"))))
    return {
        "scores": [asdict(score) for score in scores],
        "average": sum(score.value for score in scores) / len(scores) if len(scores) > 1 else None,
    }


def _model_args(hf_folder: str, dtype: str) -> dict:
    """The harness's ``hf`` model arguments. For a folder written by tools/export_hf.py, a choice
    scored without context (mutual-information metrics, empty contexts) follows EOD, as every
    document did in training, instead of the harness's default BOS, which the model never saw."""
    args = {"pretrained": hf_folder, "dtype": dtype}
    if is_export(hf_folder):  # older exports name <s> as BOS; newer ones EOD, the same id as passed here
        with open(os.path.join(hf_folder, "config.json"), encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        if isinstance(eos, int):  # a hand-edited config may lack it: the harness's default then
            args["prefix_token_id"] = eos
    return args


class _CountTruncations(logging.Filter):
    """Counts (and drops) the harness's one warning per request whose context was cut from the left
    to fit the model's positions; the count is reported once."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "exceeds model's maximum length" in record.getMessage():
            self.count += 1
            return False
        return True


def evaluate(
    hf_folder: str,
    tasks: Sequence[str],
    *,
    include_paths: Sequence[str] = (),
    manager=None,
    batch_size: int = 16,
    device: Optional[str] = None,
    dtype: str = "float32",
    limit: Optional[int] = None,
    num_fewshot: int = 0,
    seed: int = 1234,
    log_samples: bool = False,
) -> dict:
    """Run the harness on the LlamaForCausalLM folder ``hf_folder``; returns the report (JSON-able):
    ``scores`` (one :class:`TaskScore` dict per task), ``average`` (the mean of the reported metrics,
    as the paper's "Avg" column; None for one task), ``truncated_requests`` (choices whose context
    was cut from the left to fit the model's positions), the versions and the settings. ``manager``:
    the :func:`task_manager` of ``tasks`` and ``include_paths``, already built. ``log_samples`` adds ``samples``:
    per item, the task, ``doc_id``, the item's ``id`` where it has one, the ``target`` choice and
    each choice's summed log-likelihood (nats) after the context, followed, for a task scored by
    mutual information, by each choice's log-likelihood without context."""
    lm_eval = import_harness()
    manager = manager or task_manager(tasks, include_paths)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # stderr carries errors (the harness's own bars stay)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    truncations = _CountTruncations()
    harness_logger = logging.getLogger("lm_eval.models.huggingface")
    harness_logger.addFilter(truncations)
    start = time.perf_counter()
    try:
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args=_model_args(hf_folder, dtype),
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except Exception as error:
        if _is_unreachable(error):
            raise _offline_error(error) from None
        if _is_choice_too_long(error):
            raise _choice_too_long_error(hf_folder, lm_eval.__version__) from None
        raise
    finally:
        harness_logger.removeFilter(truncations)
    seconds = time.perf_counter() - start
    if truncations.count:
        logger.warning(
            "%d requests were longer than the model's positions: their context was cut from the left", truncations.count
        )
    report = {
        "model": os.path.abspath(hf_folder),
        **score_results(tasks, output),
        "truncated_requests": truncations.count,
        "settings": {
            "tasks": list(tasks),
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "device": device,
            "dtype": dtype,
            "seed": seed,
            "include_paths": [TASKS_DIR, *[os.path.abspath(p) for p in include_paths]],
        },
        "versions": {
            "lm_eval": lm_eval.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "seconds": seconds,
    }
    if log_samples:
        report["samples"] = [_sample(task, sample) for task in tasks for sample in output["samples"].get(task, [])]
    return report


def _sample(task: str, sample: dict) -> dict:
    """One item of the harness's samples, as the report keeps it (``loglikelihoods`` None for an
    item that is not scored by log-likelihoods, e.g. of a generation task)."""
    doc = sample.get("doc") or {}
    responses = sample.get("filtered_resps") or []
    scored = all(isinstance(r, (tuple, list)) and r and isinstance(r[0], (int, float)) for r in responses)
    return {
        "task": task,
        "doc_id": sample["doc_id"],
        "id": doc.get("id") if isinstance(doc, dict) else None,
        "target": sample["target"],
        "loglikelihoods": [float(r[0]) for r in responses] if responses and scored else None,
    }


def table(report: dict) -> str:
    """The scores as a Markdown table, accuracies in percent (as in the paper)."""
    lines = ["| task | metric | accuracy (%) | ± stderr | items |", "| --- | --- | ---: | ---: | ---: |"]
    for score in report["scores"]:
        stderr = "" if score["stderr"] is None else f"{100 * score['stderr']:.1f}"
        items = "" if score["items"] is None else str(score["items"])
        lines.append(f"| {score['task']} | {score['metric']} | {100 * score['value']:.1f} | {stderr} | {items} |")
    if report["average"] is not None:
        lines.append(f"| average | | {100 * report['average']:.1f} | | |")
    return "\n".join(lines)


def default_tasks() -> List[str]:
    """The paper's six tasks, in Table 1's order."""
    return list(PAPER_TASKS)
