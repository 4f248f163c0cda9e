"""The two-stage training loop: patch stage on the first lambda of the tokens, then token stage.

At the boundary the weights are kept, Adam's state is emptied, a new LR schedule (with a new
warmup) starts, the data continues on the token stage's disjoint documents, and a checkpoint
is written. ``--load`` resumes inside either stage or at the boundary.
"""

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.data.datasets import StageDataConfig, build_stage_datasets
from megatron_patch.data.tokenizer import SentencePieceTokenizer
from megatron_patch.architecture.presets import get_preset, padded_vocab_size
from megatron_patch.checkpoint import store as ckpt
from megatron_patch.training.builders import (
    build_model,
    build_optimizer,
    build_scheduler,
    gather_updated_parameters,
    reset_optimizer_state,
    unwrap,
)
from megatron_patch.training.data import micro_batches
from megatron_patch.training.flops import flops_per_position, measure_bf16_matmul_tflops
from megatron_patch.training.metrics import MetricsWriter, peak_memory_gib, reset_peak_memory
from megatron_patch.training.step import evaluate, train_step

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """One stage's plan: its name, K, steps and global batch (sequences of K*T tokens)."""

    name: str  # "patch" | "token"
    patch_size: int
    iters: int
    global_batch_size: int
    first_iteration: int  # global iteration number before its first step


@dataclass
class StageResult:
    name: str
    iterations: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    last_loss: float = float("nan")
    valid_loss: Optional[float] = None
    peak_memory_gib: Optional[float] = None  # of this process's part of the stage (not kept on resume)
    extra: dict = field(default_factory=dict)


PLAN_FLAGS = ("train_iters", "patch_size", "patch_data_fraction", "global_batch_size", "seq_length", "data_path", "split")


def _check_same_plan(args, meta) -> None:
    """A resumed run must keep the budget and the stage split the checkpoint was written under."""
    saved = meta.get("args", {})
    for name in PLAN_FLAGS:
        if name in saved and saved[name] != getattr(args, name):
            raise ckpt.CheckpointError(
                f"--load checkpoint was written with --{name.replace('_', '-')} {saved[name]}, this run has "
                f"{getattr(args, name)}: resume with the same value (start a new --save directory to change it)"
            )


class Trainer:
    """Runs the stages ``args`` asks for on this rank (distributed state already initialised)."""

    def __init__(self, args):
        self.args = args
        self.rank = dist.get_rank()
        self.preset = get_preset(args.model)
        self.tokenizer = SentencePieceTokenizer(args.tokenizer_model)
        self.vocab_size = padded_vocab_size(
            self.tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )
        self.shape = ckpt.model_shape(args, self.vocab_size)
        self.stages = self._plan()
        self.model = build_model(args, self.tokenizer.vocab_size, self.stages[0].patch_size)
        self.optimizer = build_optimizer(args, self.model)
        self.scheduler = None
        self.metrics = MetricsWriter(args, enabled=self.rank == 0)
        self.flops_per_position = flops_per_position(self.preset, args.seq_length, self.vocab_size)
        self.peak_tflops = None
        if not args.cpu and args.bf16:
            self.peak_tflops = measure_bf16_matmul_tflops()
        self.stop_requested = False
        self.datasets = self._build_datasets()

    # ----------------------------------------------------------------- planning
    def _plan(self):
        args = self.args
        K = args.patch_size
        stages = []
        if K > 1 and args.stage in ("both", "patch"):
            stages.append(Stage("patch", K, args.patch_iters, args.global_batch_size // K, 0))
        if args.stage in ("both", "token"):
            stages.append(Stage("token", 1, args.token_iters, args.global_batch_size, args.patch_iters))
        return stages

    def _build_datasets(self):
        args = self.args
        wanted = {stage.name: stage.iters * stage.global_batch_size for stage in self.stages}
        valid = args.eval_iters * args.global_batch_size
        config = StageDataConfig(
            data_path=list(args.data_path),
            split=args.split,
            seq_length=args.seq_length,
            patch_size=args.patch_size,
            patch_data_fraction=args.patch_data_fraction,
            seed=args.seed,
            cache_dir=args.data_cache_path,
        )
        return build_stage_datasets(
            config,
            self.tokenizer,
            {"patch_train": wanted.get("patch", 0), "token_train": wanted.get("token", 0), "valid": valid},
        )

    # ----------------------------------------------------------------- helpers
    def _dataset(self, stage: Stage):
        return self.datasets.patch_train if stage.name == "patch" else self.datasets.token_train

    def _iterator(self, dataset, consumed_samples):
        return micro_batches(
            dataset,
            consumed_samples,
            self.args.micro_batch_size,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            num_workers=self.args.num_workers,
            pin_memory=not self.args.cpu,
        )

    def _num_microbatches(self, global_batch_size: int) -> int:
        return global_batch_size // (self.args.micro_batch_size * self.args.data_parallel_size)

    def _set_patch_size(self, patch_size: int) -> None:
        for chunk in self.model:
            unwrap(chunk).set_patch_size(patch_size)

    def _validate(self) -> Optional[float]:
        if self.datasets.valid is None or not self.args.eval_iters:
            return None
        gather_updated_parameters(self.model)
        return evaluate(
            self.model,
            lambda: self._iterator(self.datasets.valid, 0),
            self.args.eval_iters,
            self._num_microbatches(self.args.global_batch_size),
            self.args.seq_length,
            self.args.micro_batch_size,
        )

    def _save(self, iteration, stage: Stage, stage_iteration, consumed_samples, results):
        if not self.args.save:
            return
        progress = {
            "stage": stage.name,
            "stage_iteration": stage_iteration,
            "stage_complete": stage_iteration == stage.iters,
            "consumed_samples": consumed_samples,
            "patch_size": self.args.patch_size,
            "patch_data_fraction": self.args.patch_data_fraction,
            "consumed_tokens": {r.name: r.tokens for r in results},
            "seconds": {r.name: r.seconds for r in results},
        }
        gather_updated_parameters(self.model)
        ckpt.save_checkpoint(
            self.args.save, iteration, self.model, self.optimizer, self.scheduler, progress, self.args,
            self.shape, self.args.keep_last_checkpoints,
        )

    def _stop_flag(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _device(self):
        return next(self.model[0].parameters()).device

    # ----------------------------------------------------------------- resume
    def _resume(self):
        """Returns (stage index, stage iteration, consumed samples, results) to start from."""
        args = self.args
        results = [StageResult(stage.name) for stage in self.stages]
        if args.pretrained_checkpoint:
            ckpt.load_checkpoint(args.pretrained_checkpoint, self.model, self.shape, restore_rng=False)
            self.optimizer.reload_model_params()
            return 0, 0, 0, results
        if not args.load:
            if args.save and ckpt.read_tracker(args.save) is not None:
                raise ckpt.CheckpointError(
                    f"--save {args.save} already holds checkpoints (latest iteration "
                    f"{ckpt.read_tracker(args.save)}): pass --load {args.save} to resume, or use an empty directory"
                )
            return 0, 0, 0, results
        if ckpt.read_tracker(args.load) is None and not os.path.exists(os.path.join(args.load, ckpt.METADATA)):
            logger.warning("--load %s holds no checkpoint yet: starting from scratch", args.load)
            return 0, 0, 0, results
        meta = ckpt.read_metadata(ckpt.resolve_checkpoint(args.load))
        _check_same_plan(args, meta)
        progress = meta["progress"]
        names = [stage.name for stage in self.stages]
        if progress["stage"] not in names:
            raise ckpt.CheckpointError(
                f"--load {args.load} is a {progress['stage']}-stage checkpoint but this run has stages "
                f"{names}: use --stage token --pretrained-checkpoint for a separate token stage"
            )
        index = names.index(progress["stage"])
        stage = self.stages[index]
        self._set_patch_size(stage.patch_size)
        self.scheduler = build_scheduler(args, self.optimizer, stage.iters)
        ckpt.load_checkpoint(args.load, self.model, self.shape, self.optimizer, self.scheduler)
        for plan, result in zip(self.stages, results):
            result.tokens = progress["consumed_tokens"].get(result.name, 0)
            result.seconds = progress["seconds"].get(result.name, 0.0)
            result.iterations = result.tokens // args.tokens_per_step
            result.flops = result.iterations * self.flops_per_position * plan.global_batch_size * args.seq_length
        if progress["stage_iteration"] >= stage.iters and index + 1 < len(self.stages):
            return index + 1, 0, 0, results  # at the boundary: the next stage starts fresh
        return index, progress["stage_iteration"], progress["consumed_samples"], results

    # ----------------------------------------------------------------- run
    def run(self) -> dict:
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            start_index, stage_iteration, consumed, results = self._resume()
            self.results = results
            for index in range(start_index, len(self.stages)):
                resumed = index == start_index and stage_iteration > 0
                stopped = self._run_stage(self.stages[index], results[index], resumed, stage_iteration, consumed)
                if stopped:
                    return self._summary(results, interrupted=True)
                stage_iteration, consumed = 0, 0
            return self._summary(results, interrupted=False)
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            self.metrics.close()

    def _on_sigterm(self, signum, frame):
        logger.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.stop_requested = True

    def _run_stage(self, stage: Stage, result: StageResult, resumed: bool, stage_iteration: int, consumed: int) -> bool:
        """Train ``stage`` from ``stage_iteration``; returns True when stopped by SIGTERM."""
        args = self.args
        self._set_patch_size(stage.patch_size)
        reset_peak_memory()
        if not resumed:
            reset_optimizer_state(self.optimizer)
            self.scheduler = build_scheduler(args, self.optimizer, stage.iters)
            logger.info("%s stage: %d steps of %d sequences x %d tokens (K=%d), fresh optimizer state and LR warmup",
                        stage.name, stage.iters, stage.global_batch_size, stage.patch_size * args.seq_length,
                        stage.patch_size)
        iterator = self._iterator(self._dataset(stage), consumed)
        num_microbatches = self._num_microbatches(stage.global_batch_size)
        tokens_per_step = stage.global_batch_size * stage.patch_size * args.seq_length
        flops_per_step = self.flops_per_position * stage.global_batch_size * args.seq_length
        window_seconds, window_steps, skipped = 0.0, 0, 0
        while stage_iteration < stage.iters:
            step_start = time.perf_counter()
            loss, grad_norm, was_skipped = train_step(
                self.model, self.optimizer, self.scheduler, iterator, num_microbatches,
                args.seq_length, args.micro_batch_size,
            )
            stage_iteration += 1
            consumed += stage.global_batch_size
            skipped += int(was_skipped)
            elapsed = time.perf_counter() - step_start
            result.iterations += 1
            result.tokens += tokens_per_step
            result.flops += flops_per_step
            result.seconds += elapsed
            result.last_loss = loss
            window_steps += 1
            window_seconds += elapsed
            iteration = stage.first_iteration + stage_iteration
            if stage_iteration % args.log_interval == 0 or stage_iteration == stage.iters:
                self.metrics.log_step(
                    stage=stage.name, iteration=iteration, stage_iteration=stage_iteration, stage_iters=stage.iters,
                    tokens=result.tokens, loss=loss, lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=grad_norm, skipped=skipped, tokens_per_s=window_steps * tokens_per_step / window_seconds,
                    tflops=window_steps * flops_per_step / window_seconds / 1e12, peak_tflops=self.peak_tflops,
                )
                window_seconds, window_steps = 0.0, 0
            if args.eval_interval and iteration % args.eval_interval == 0:
                self.metrics.log_valid(stage.name, iteration, self._validate())
            stop = self._stop_flag()
            if stop or stage_iteration == stage.iters or (args.save_interval and iteration % args.save_interval == 0):
                self._save(iteration, stage, stage_iteration, consumed, self.results)
            if stop:
                logger.warning("stopped by SIGTERM at iteration %d; resume with --load %s", iteration, args.save)
                result.peak_memory_gib = peak_memory_gib()
                return True
        last_iteration = stage.first_iteration + stage.iters
        if not (args.eval_interval and last_iteration % args.eval_interval == 0):
            result.valid_loss = self._validate()
            self.metrics.log_valid(stage.name, last_iteration, result.valid_loss)
        else:
            result.valid_loss = self.metrics.last_valid_loss
        result.peak_memory_gib = peak_memory_gib()  # the peak only grows within a stage: read it once
        return False

    def _summary(self, results, interrupted: bool) -> dict:
        args = self.args
        total_tokens = sum(r.tokens for r in results)
        total_flops = sum(r.flops for r in results)
        token_only_flops = self.flops_per_position * total_tokens
        summary = {
            "interrupted": interrupted,
            "stages": {r.name: {"iterations": r.iterations, "tokens": r.tokens, "flops": r.flops,
                                "seconds": r.seconds, "last_loss": r.last_loss, "valid_loss": r.valid_loss,
                                "peak_memory_gib": r.peak_memory_gib}
                       for r in results},
            "total_tokens": total_tokens,
            "relative_flops_vs_token_only": total_flops / token_only_flops if token_only_flops else None,
            "theoretical_relative_cost": (args.patch_data_fraction / args.patch_size + 1 - args.patch_data_fraction)
            if args.patch_size > 1 else 1.0,
        }
        token = next((r for r in results if r.name == "token" and r.seconds > 0), None)
        if token is not None and total_tokens:
            token_only_seconds = total_tokens / (token.tokens / token.seconds)
            summary["relative_time_vs_token_only"] = sum(r.seconds for r in results) / token_only_seconds
        self.metrics.log_summary(summary)
        return summary
