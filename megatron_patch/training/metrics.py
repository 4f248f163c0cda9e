"""Training logs: a console line per log interval, a JSON-lines metrics file, TensorBoard if installed.

Only the rank that owns the writer (global rank 0) writes; every logged value is already reduced
over the world (peak memory: the max over ranks). The patch-stage loss is labelled ``patch loss``
(``patch_loss`` in the records, ``train/patch-loss`` in TensorBoard and W&B): it is the mean of K
cross-entropies against the next patch and is not comparable with the token loss; validation
losses are always token level.
"""

import json
import logging
import math
import os
from typing import Optional

import torch

from megatron_patch.runtime import atomic_file

logger = logging.getLogger("megatron_patch.train")


def peak_memory_gib() -> float:
    """Peak memory of this process: on GPU the CUDA allocator's peak since the last
    :func:`reset_peak_memory` (weights, gradients, optimizer state and activations); on CPU the
    peak resident set since the process started (the kernel's figure cannot be reset)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory() -> None:
    """Start a new peak (GPU): each stage reports its own."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def format_flops(flops: float) -> str:
    """A FLOP count in a readable unit: ``12.345 TFLOP``, ``3.210 PFLOP``, ``1.500 EFLOP``, then ``2.000e+21 FLOP``."""
    if flops >= 1e21:
        return f"{flops:.3e} FLOP"
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops / 1e12:.3f} TFLOP"


def _drop_records_after(path: str, iteration: int) -> None:
    """Keep the records of ``path`` (JSON lines) up to global ``iteration``; a summary (an earlier,
    interrupted run's: the resumed run writes its own) and an unreadable line (a kill mid-write) are
    dropped."""
    if not os.path.exists(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get("kind") != "summary" and record.get("iteration", 0) <= iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        atomic_file.write_text(path, "".join(kept))
        logger.info("%s: dropped %d records after iteration %d (logged again by this run)", path, dropped, iteration)


def tensorboard_writer_args(log_dir: str, resumed_from: int) -> dict:
    """``SummaryWriter``'s arguments: a resumed run purges the events a killed run logged after
    global iteration ``resumed_from`` (the checkpoint), as the resumed run logs them again."""
    args = {"log_dir": log_dir}
    if resumed_from:
        args["purge_step"] = resumed_from + 1
    return args


class MetricsWriter:
    """Console + ``<save>/metrics.jsonl`` (+ ``--tensorboard-dir``, + W&B with ``--wandb-project``)
    writer for one run. Nothing is created before :meth:`open`, which the trainer calls once the run
    has started (or resumed) without error, so a failed start leaves no file behind.

    Args:
        settings: the run's ``LogSettings``.
        save: the ``--save`` folder (None: no metrics file).
        enabled: whether this rank writes (global rank 0).
        run_flags: the run's flags, stored as the W&B run's config.
    """

    def __init__(self, settings, save: Optional[str], enabled: bool, run_flags: Optional[dict] = None):
        self.enabled = enabled
        self.settings = settings
        self.save = save
        self.run_flags = run_flags or {}
        self.file = None
        self.tensorboard = None
        self.wandb = None
        self.summary_path = settings.summary_json
        self.last_valid_loss = None

    def open(self, resumed_from: int) -> None:
        """Start writing, after global iteration ``resumed_from`` (0 for a fresh run): records of
        later iterations that a killed run left in ``metrics.jsonl`` are dropped first (rewritten
        under a temporary name), so a resumed run never logs a step twice; TensorBoard drops them
        too (``purge_step``) and a W&B run continues the one whose id ``--save`` holds."""
        if not self.enabled:
            return
        settings, save = self.settings, self.save
        if save:
            os.makedirs(save, exist_ok=True)
            path = os.path.join(save, "metrics.jsonl")
            _drop_records_after(path, resumed_from)
            self.file = open(path, "a")
        if settings.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("--tensorboard-dir given but tensorboard is not installed (pip install tensorboard)")
            else:
                self.tensorboard = SummaryWriter(**tensorboard_writer_args(settings.tensorboard_dir, resumed_from))
        if settings.wandb_project:
            from megatron_patch.training.tracking import WandbWriter

            save_dir = settings.wandb_save_dir or (os.path.join(save, "wandb") if save else "wandb")
            self.wandb = WandbWriter(
                settings.wandb_project, settings.wandb_exp_name, save_dir, self.run_flags, id_folder=save
            )

    def _record(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def log_step(
        self,
        *,
        stage,
        iteration,
        stage_iteration,
        stage_iters,
        patch_size,
        tokens,
        run_tokens,
        loss,
        lr,
        grad_norm,
        skipped,
        tokens_per_s,
        tflops_per_gpu,
        peak_tflops: Optional[float],
        peak_memory: Optional[float],
    ) -> None:
        """One training log record. ``tokens``: the stage's training tokens so far (it restarts at the
        stage switch), ``run_tokens``: the run's; ``tokens_per_s``: the whole run's rate (all ranks);
        ``tflops_per_gpu``: model FLOP/s of the window divided by the world size (TFLOP/s), and MFU
        that over ``peak_tflops``, one GPU's measured bf16 matmul rate; ``peak_memory``: the stage's
        peak so far, the max over ranks (GiB)."""
        if not self.enabled:
            return
        loss_name = "patch loss" if stage == "patch" else "loss"
        mfu = tflops_per_gpu / peak_tflops if peak_tflops else None
        parts = [
            f"[{stage}] iter {stage_iteration}/{stage_iters} (global {iteration})",
            f"stage tokens {tokens / 1e6:.3f}M",
            f"{loss_name} {loss:.4f}",
            f"lr {lr:.3e}",
            f"grad norm {grad_norm:.3f}" if grad_norm is not None else "grad norm n/a",
            f"skipped {skipped}",
            f"{tokens_per_s:,.0f} tok/s (all GPUs)",
            (f"{tflops_per_gpu:.1f} TFLOP/s/GPU" if tflops_per_gpu >= 1 else f"{tflops_per_gpu * 1e3:.2f} GFLOP/s/GPU")
            + (f" MFU {100 * mfu:.1f}%" if mfu is not None else ""),
        ]
        if peak_memory is not None:
            parts.append(f"peak mem (max over ranks) {peak_memory:.2f} GiB")
        logger.info(" | ".join(parts))
        record = {
            "kind": "train",
            "stage": stage,
            "iteration": iteration,
            "stage_iteration": stage_iteration,
            "patch_size": patch_size,
            "tokens": tokens,
            "run_tokens": run_tokens,
            "patch_loss" if stage == "patch" else "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": skipped,
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": tflops_per_gpu,
            "mfu": mfu,
            "peak_memory_gib": peak_memory,
        }
        self._record(record)
        self._scalars(
            {
                "train/patch-loss" if stage == "patch" else "train/loss": loss,
                "train/patch_size": patch_size,
                "train/run_tokens": run_tokens,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/skipped": skipped,
                "train/tokens_per_s": tokens_per_s,
                "train/tflops_per_gpu": tflops_per_gpu,
                "train/mfu": mfu,
                "train/peak_memory_gib": peak_memory,
            },
            iteration,
        )

    def log_valid(self, stage: str, iteration: int, loss: Optional[float]) -> None:
        self.last_valid_loss = loss
        if not self.enabled or loss is None:
            return
        ppl = math.exp(min(loss, 50.0))
        logger.info(
            "[%s] validation (token level) at global iter %d | loss %.4f | ppl %.2f", stage, iteration, loss, ppl
        )
        self._record({"kind": "valid", "stage": stage, "iteration": iteration, "loss": loss, "ppl": ppl})
        self._scalars({"valid/loss": loss}, iteration)

    def log_checkpoint(
        self,
        stage: str,
        iteration: int,
        path: str,
        seconds: float,
        blocked_seconds: Optional[float] = None,
        completed_at: Optional[int] = None,
    ) -> None:
        """A checkpoint of ``iteration`` complete on every rank at ``path``, ``seconds`` after the
        save began (all ranks' writes, the manifest and the rename). For a save written in the
        background (``--async-save``): ``blocked_seconds``, the part of it training waited for, and
        ``completed_at``, the iteration at whose end it was completed; its scalars are logged at that
        iteration (W&B takes no step lower than one it has logged)."""
        if not self.enabled:
            return
        record = {"kind": "checkpoint", "stage": stage, "iteration": iteration, "path": path, "seconds": seconds}
        if blocked_seconds is None:
            logger.info("[%s] saved checkpoint %s in %.2f s", stage, path, seconds)
        else:
            logger.info(
                "[%s] saved checkpoint %s in %.2f s, in the background (training waited %.2f s)",
                stage,
                path,
                seconds,
                blocked_seconds,
            )
            record.update(blocked_seconds=blocked_seconds, completed_at_iteration=completed_at)
        self._record(record)
        scalars = {"checkpoint/save_seconds": seconds, "checkpoint/blocked_seconds": blocked_seconds}
        self._scalars(scalars, iteration if completed_at is None else completed_at)

    def _scalars(self, scalars: dict, iteration: int) -> None:
        """``{tag: value}`` to TensorBoard and W&B; x axis: the global iteration (tokens per step
        are equal in both stages); None values are left out."""
        scalars = {tag: value for tag, value in scalars.items() if value is not None}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, iteration)
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)

    def log_summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        lines = ["summary (interrupted: resume with --load to finish):" if summary["interrupted"] else "summary:"]
        for name, stage in summary["stages"].items():
            lines.append(
                f"  {name:5s} stage: {stage['iterations']} steps, {stage['tokens'] / 1e6:.3f}M tokens, "
                f"{format_flops(stage['flops'])}, {stage['seconds']:.1f} s of steps"
                + (
                    f", peak memory (max over ranks) {stage['peak_memory_gib']:.2f} GiB"
                    if stage.get("peak_memory_gib")
                    else ""
                )
                + (f", valid loss {stage['valid_loss']:.4f}" if stage["valid_loss"] is not None else "")
            )
        if summary["relative_flops_vs_token_only"] is not None:
            lines.append(
                f"  FLOPs relative to token-only training of the same tokens: "
                f"{summary['relative_flops_vs_token_only']:.3f} "
                f"(theory for this job's stages = {summary['theoretical_relative_cost']:.3f})"
            )
        if "relative_time_vs_token_only" in summary:
            lines.append(
                f"  step time relative to token-only training, extrapolated from the token stage's mean step: "
                f"{summary['relative_time_vs_token_only']:.3f}"
            )
        if summary.get("matmul_peak_tflops"):
            lines.append(
                f"  MFU is against the measured bf16 matmul rate, {summary['matmul_peak_tflops']:.1f} TFLOP/s per GPU"
            )
        logger.info("\n".join(lines))
        self._record({"kind": "summary", **summary})
        if self.summary_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.summary_path)), exist_ok=True)  # checked at start
            atomic_file.write_json(self.summary_path, summary)
        if self.wandb is not None:
            self.wandb.write_summary(summary)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None
