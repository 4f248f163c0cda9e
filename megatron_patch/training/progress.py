"""What a run has done: each stage's counts, the progress record a checkpoint carries, and the
run's closing summary.

* :class:`StageResult` -- one stage's steps, tokens, model FLOPs, wall seconds and losses so far.
* :func:`checkpoint_progress` -- the ``progress`` record of a checkpoint's metadata: where in which
  stage the run is, and what each stage has consumed (what ``--load`` resumes from).
* :func:`restore_results` -- the stage results a resumed run continues from that record.
* :func:`run_summary` -- the summary the trainer logs, writes (``--summary-json``) and returns.

Units: ``tokens`` are training tokens (a patch-stage step of ``b`` samples consumes ``b·K·T``),
``flops`` model FLOPs (``training/flops.py``), ``seconds`` the summed step wall times (no
start-up, validation or checkpoint time).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megatron_patch.training.plan import RunPlan, StagePlan


@dataclass
class StageResult:
    name: str
    iterations: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    last_loss: Optional[float] = None  # None: not known (no step yet; a checkpoint that did not record it)
    epochs: Optional[float] = None  # passes over the stage's documents (tokens trained on / tokens they hold)
    valid_loss: Optional[float] = None  # the stage's closing validation; None: none (yet)
    peak_memory_gib: Optional[float] = None  # the stage's peak, max over ranks (kept over a resume)


def checkpoint_progress(
    plan: RunPlan, stage: StagePlan, stage_iteration: int, consumed_samples: int, results: Sequence[StageResult]
) -> dict:
    """The progress record saved with a checkpoint after ``stage_iteration`` steps of ``stage``
    (``consumed_samples``: samples of the stage's dataset read so far). Each stage's last training
    loss and closing validation loss are recorded (None where not known yet: the stage's closing
    validation runs before its last save, but a stop at its last step saves without it), so a
    resumed run's summary keeps those of the stages it does not run again."""
    return {
        "stage": stage.name,
        "stage_iteration": stage_iteration,
        "stage_complete": stage_iteration == stage.iterations,
        "consumed_samples": consumed_samples,
        "patch_size": plan.patch_size,
        "patch_data_fraction": plan.patch_data_fraction,
        "consumed_tokens": {r.name: r.tokens for r in results},
        "seconds": {r.name: r.seconds for r in results},
        "last_loss": {r.name: r.last_loss for r in results},
        "valid_loss": {r.name: r.valid_loss for r in results},
        "peak_memory_gib": {r.name: r.peak_memory_gib for r in results},
    }


def restore_results(stages: Sequence[StagePlan], progress: dict, flops_per_position: float) -> List[StageResult]:
    """Each planned stage's result as recorded by :func:`checkpoint_progress` (steps and FLOPs
    from the tokens consumed; the losses as recorded, None from a checkpoint written before they
    were; each stage's peak memory so far, None where not recorded)."""
    results = []
    for stage in stages:
        result = StageResult(stage.name)
        result.tokens = progress["consumed_tokens"].get(stage.name, 0)
        result.seconds = progress["seconds"].get(stage.name, 0.0)
        result.last_loss = progress.get("last_loss", {}).get(stage.name)
        result.valid_loss = progress.get("valid_loss", {}).get(stage.name)
        result.peak_memory_gib = progress.get("peak_memory_gib", {}).get(stage.name)
        result.iterations = result.tokens // stage.tokens_per_step
        result.flops = result.iterations * flops_per_position * stage.positions_per_step
        results.append(result)
    return results


def run_summary(
    results: Sequence[StageResult],
    plan: RunPlan,
    flops_per_position: float,
    corpus_train_tokens: int,
    interrupted: bool,
    matmul_peak_tflops: Optional[float] = None,
) -> Dict[str, object]:
    """The run's summary: per stage (steps, tokens, epochs, FLOPs, seconds, losses, peak memory
    over ranks; the patch stage's last loss is ``last_patch_loss``), the training split's size
    (``corpus_train_tokens``) and the tokens trained (``total_tokens``), the FLOPs relative to
    token-only training on the same tokens, the plan's theoretical cost, the measured bf16 matmul
    rate MFU is against (``matmul_peak_tflops``, TFLOP/s per GPU; None on CPU) and, once the token
    stage has run, the summed step time relative to token-only training extrapolated from the token
    stage's mean step."""
    total_tokens = sum(r.tokens for r in results)
    token_only_flops = flops_per_position * total_tokens
    summary = {
        "interrupted": interrupted,
        "stage_split": plan.stage_split,
        "corpus_train_tokens": corpus_train_tokens,
        "stages": {
            r.name: {
                "iterations": r.iterations,
                "tokens": r.tokens,
                "epochs": r.epochs,
                "flops": r.flops,
                "seconds": r.seconds,
                "last_patch_loss" if r.name == "patch" else "last_loss": r.last_loss,
                "valid_loss": r.valid_loss,
                "peak_memory_gib": r.peak_memory_gib,
            }
            for r in results
        },
        "total_tokens": total_tokens,
        "relative_flops_vs_token_only": sum(r.flops for r in results) / token_only_flops if token_only_flops else None,
        "theoretical_relative_cost": plan.theoretical_relative_cost,
        "matmul_peak_tflops": matmul_peak_tflops,
    }
    token = next((r for r in results if r.name == "token" and r.seconds > 0), None)
    if token is not None and total_tokens:
        token_only_seconds = total_tokens / (token.tokens / token.seconds)
        summary["relative_time_vs_token_only"] = sum(r.seconds for r in results) / token_only_seconds
    return summary
