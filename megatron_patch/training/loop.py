"""The two-stage training loop: patch stage on the first lambda of the tokens, then token stage.

At the boundary the weights are kept, Adam's state is emptied, a new LR schedule (with a new
warmup) starts, the data continues on the token stage's dataset (its own documents with
``--stage-split documents``; all training documents again, in a new order, with ``epochs``), and
a checkpoint is written. ``--load`` resumes inside either stage or at the boundary (what the
checkpoint must share with the run: :mod:`~megatron_patch.training.resume`).
"""

import contextlib
import logging
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as ckpt
from megatron_patch.checkpoint.async_save import PendingSave
from megatron_patch.checkpoint.lock import locked_save_folder
from megatron_patch.checkpoint.model_record import model_shape
from megatron_patch.data.tokenizer import SentencePieceTokenizer
from megatron_patch.runtime.rank_zero import on_rank_zero
from megatron_patch.training import resume
from megatron_patch.training.builders import (
    build_model,
    build_optimizer,
    build_scheduler,
    gather_updated_parameters,
    reset_optimizer_state,
)
from megatron_patch.training.config import TrainerConfig
from megatron_patch.training.data import micro_batches
from megatron_patch.training.flops import flops_per_position, measure_bf16_matmul_tflops
from megatron_patch.training.manual_gc import ManualGC
from megatron_patch.training.metrics import MetricsWriter, peak_memory_gib, reset_peak_memory
from megatron_patch.training.plan import StagePlan
from megatron_patch.training.preemption import StopSignals
from megatron_patch.training.profiling import StepProfiler
from megatron_patch.training.progress import StageResult, checkpoint_progress, restore_results, run_summary
from megatron_patch.training.run_datasets import build_run_datasets, corpus_record, stage_data_tokens
from megatron_patch.training.step import ValidationStopped, evaluate, train_step

logger = logging.getLogger(__name__)


class Trainer:
    """Runs the stages of ``config.plan`` on this rank (distributed state already initialised).

    ``stop``: the stop signals, when the caller holds them over more than :meth:`run` (the
    command line holds them from start-up to exit, so that a signal during start-up stops the run
    at its first step, with a checkpoint, and one after the run has ended does not end the process
    with the signal's default action); without it :meth:`run` installs its own.
    """

    def __init__(self, config: TrainerConfig, stop: Optional[StopSignals] = None):
        self.config = config
        self.plan = config.plan
        self.rank = dist.get_rank()
        self.tokenizer = SentencePieceTokenizer(config.data.tokenizer_model)
        self.shape = model_shape(config.model.preset, config.model.padded_vocab_size)
        self.model = build_model(config)
        self.optimizer = build_optimizer(config.optimizer, self.model)
        self.scheduler = None
        self.metrics = MetricsWriter(
            config.logging, config.checkpoints.save, enabled=self.rank == 0, run_flags=config.flags
        )
        self.flops_per_position = flops_per_position(
            config.model.preset, self.plan.seq_length, config.model.padded_vocab_size
        )
        self.peak_tflops = None
        if not config.cpu and config.model.bf16:
            self.peak_tflops = measure_bf16_matmul_tflops()
            if self.rank == 0:
                logger.info(
                    "MFU is against the measured bf16 matmul rate, %.1f TFLOP/s per GPU (not the datasheet's "
                    "peak); its model FLOPs count the full attention square (flops.py)",
                    self.peak_tflops,
                )
        checkpoints = config.checkpoints
        if stop is not None:  # held by the caller
            self.stop, self._stop_scope = stop, contextlib.nullcontext()
        else:  # installed by run()
            self.stop = StopSignals(checkpoints.stop_signals, time_limit_minutes=checkpoints.exit_duration_minutes)
            self._stop_scope = self.stop
        self.datasets = build_run_datasets(config, self.tokenizer)
        # what checkpoints record of the run: its flags, and the corpus they name
        self.recorded = dict(config.flags, **corpus_record(self.datasets.splits))
        self.profiler = StepProfiler(config.profile, self.rank)
        self.manual_gc = ManualGC(config.manual_gc_interval)
        self.pending_save = (
            PendingSave(self._saved_in_background, checkpoints.stop_signals) if checkpoints.async_save else None
        )
        self._in_flight = None  # (stage name, iteration) of the save in flight
        self._iteration = 0  # the global iteration last trained

    # ----------------------------------------------------------------- helpers
    def _dataset(self, stage: StagePlan):
        return self.datasets.patch_train if stage.name == "patch" else self.datasets.token_train

    def _iterator(self, dataset, consumed_samples: int, micro_batch_size: int):
        """Micro-batches of ``micro_batch_size`` samples of ``dataset`` for this data-parallel rank,
        from the ``consumed_samples``-th sample of the global order on."""
        return micro_batches(
            dataset,
            consumed_samples,
            micro_batch_size,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            num_workers=self.config.data.num_workers,
            pin_memory=not self.config.cpu,
            stop_signals=self.config.checkpoints.stop_signals,
        )

    def _validate(self) -> Optional[float]:
        if self.datasets.valid is None or not self.plan.validation.iterations:
            return None
        gather_updated_parameters(self.model)
        return evaluate(
            self.model,
            lambda: self._iterator(self.datasets.valid, 0, self.plan.validation.micro_batch_size),
            self.plan.validation,
            stopped=self._stop_flag,
        )

    def _save(self, iteration, stage: StagePlan, stage_iteration, consumed_samples, results, background=False):
        """Save at ``iteration``; ``background``: in a forked writer, with ``--async-save``."""
        checkpoints = self.config.checkpoints
        if not checkpoints.save:
            return
        pending = self.pending_save if background else None
        if self.pending_save is not None and pending is None:
            self.pending_save.wait()  # complete the save in flight before this one
        progress = checkpoint_progress(self.plan, stage, stage_iteration, consumed_samples, results)
        gather_updated_parameters(self.model)
        start = time.perf_counter()  # a background save times itself, after waiting for the one in flight
        path = ckpt.save_checkpoint(
            checkpoints.save,
            iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            progress,
            self.recorded,
            self.shape,
            checkpoints.keep_last,
            fully_parallel=checkpoints.fully_parallel_save,
            retain=self.plan.stage_ends[:-1],
            pending=pending,
        )
        if path is not None and pending is not None:
            self._in_flight = (stage.name, iteration)
        elif path is not None:
            self.metrics.log_checkpoint(stage.name, iteration, path, time.perf_counter() - start)

    def _saved_in_background(self, path: str, seconds: float, blocked_seconds: float) -> None:
        stage_name, iteration = self._in_flight
        self.metrics.log_checkpoint(
            stage_name, iteration, path, seconds, blocked_seconds=blocked_seconds, completed_at=self._iteration
        )

    def _stop_flag(self) -> bool:
        flag = torch.tensor([1.0 if self.stop.reason() else 0.0], device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _update_peak_memory(self, result: StageResult) -> None:
        """``result``'s peak memory: the max over ranks (the last pipeline stage, with the output layer
        and the loss, holds the most) and over the runs the stage was resumed across."""
        peak = torch.tensor([peak_memory_gib()], dtype=torch.float64, device=self._device())
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        result.peak_memory_gib = max(peak.item(), result.peak_memory_gib or 0.0)

    def _device(self):
        return next(self.model[0].parameters()).device

    # ----------------------------------------------------------------- resume
    def _resume(self):
        """Returns (stage index, stage iteration, consumed samples, results) to start from.

        As in Megatron-LM, ``--load`` wins when it holds a checkpoint (a requeued job resumes);
        otherwise the run starts fresh, its weights from ``--pretrained-checkpoint`` when given. A
        fresh start refuses a ``--save`` that already holds checkpoints (they would be taken for
        this run's)."""
        checkpoints = self.config.checkpoints
        stages = self.plan.stages
        found = on_rank_zero(resume.checkpoint_to_resume, checkpoints)  # every rank loads the checkpoint rank 0 sees
        if found is not None:
            return self._resume_from(found)
        if checkpoints.pretrained_checkpoint:
            path = checkpoints.pretrained_checkpoint
            pretrained = on_rank_zero(folders.resolve_checkpoint, path)  # the same checkpoint on every rank
            meta = ckpt.read_metadata(pretrained)
            on_rank_zero(resume.check_token_stage_start, self.recorded, self.plan, path, meta)  # one verdict
            ckpt.load_checkpoint(
                pretrained,
                self.model,
                self.shape,
                restore_rng=False,
                verify=checkpoints.verify,
                fully_parallel=checkpoints.fully_parallel_load,
            )
            self.optimizer.reload_model_params()
        return 0, 0, 0, [StageResult(stage.name) for stage in stages]

    def _resume_from(self, found: str):
        """Resume the run from the checkpoint directory ``found`` (what ``--load`` names)."""
        checkpoints = self.config.checkpoints
        stages = self.plan.stages
        load = checkpoints.load
        meta = ckpt.read_metadata(found)
        names = [stage.name for stage in stages]
        on_rank_zero(resume.check_resumed_checkpoint, self.recorded, load, meta, names)  # one verdict for all ranks
        progress = meta["progress"]
        index = names.index(progress["stage"])
        stage = stages[index]
        self.scheduler = build_scheduler(self.config.optimizer, self.optimizer, stage.iterations)
        ckpt.load_checkpoint(
            found,
            self.model,
            self.shape,
            self.optimizer,
            self.scheduler,
            verify=checkpoints.verify,
            fully_parallel=checkpoints.fully_parallel_load,
        )
        results = restore_results(stages, progress, self.flops_per_position)
        if progress["stage_iteration"] >= stage.iterations and index + 1 < len(stages):
            return index + 1, 0, 0, results  # at the boundary: the next stage starts fresh
        return index, progress["stage_iteration"], progress["consumed_samples"], results

    # ----------------------------------------------------------------- run
    def run(self) -> dict:
        """Train the planned stages; returns the summary (``interrupted`` after a stop signal or the time limit)."""
        with (
            self._stop_scope,
            locked_save_folder(
                self.config.checkpoints.save, self.config.checkpoints.lock_wait_seconds, self.stop.reason
            ),
            self.manual_gc,
        ):
            try:
                return self._run_stages()
            except BaseException:
                if self.pending_save is not None:
                    self.pending_save.abort()  # before the --save lock is released
                raise
            finally:
                self.profiler.close()
                self.metrics.close()

    def _run_stages(self) -> dict:
        start_index, stage_iteration, consumed, results = self._resume()
        self.metrics.open(resumed_from=self.plan.stages[start_index].first_iteration + stage_iteration)
        self.results = results
        # resumed right after a stage's last step whose closing validation did not run (a stop at
        # that step saves first): the weights are that stage's last, so it runs now
        finished = None
        if stage_iteration >= self.plan.stages[start_index].iterations:  # the last stage, complete
            finished = start_index
        elif stage_iteration == 0 and start_index > 0:  # at a stage boundary
            finished = start_index - 1
        if finished is not None and results[finished].valid_loss is None:
            try:
                self._close_stage(self.plan.stages[finished], results[finished], validated=False)
            except ValidationStopped:  # nothing trained since the checkpoint: the next resume validates
                self._log_stop(self.plan.stages[finished].first_iteration + self.plan.stages[finished].iterations)
                return self._summary(results, interrupted=True)
        for index in range(start_index, len(self.plan.stages)):
            resumed = index == start_index and stage_iteration > 0
            stopped = self._run_stage(self.plan.stages[index], results[index], resumed, stage_iteration, consumed)
            if stopped:
                return self._summary(results, interrupted=True)
            stage_iteration, consumed = 0, 0
        return self._summary(results, interrupted=False)

    def _run_stage(
        self, stage: StagePlan, result: StageResult, resumed: bool, stage_iteration: int, consumed: int
    ) -> bool:
        """Train ``stage`` from ``stage_iteration``; returns True when stopped (a signal, the time limit)."""
        log, save_interval = self.config.logging, self.config.checkpoints.save_interval
        reset_peak_memory()
        if not resumed:
            reset_optimizer_state(self.optimizer)
            self.scheduler = build_scheduler(self.config.optimizer, self.optimizer, stage.iterations)
            logger.info(
                "%s stage: %d steps of %d sequences x %d tokens (K=%d), fresh optimizer state and LR warmup",
                stage.name,
                stage.iterations,
                stage.samples_per_step,
                stage.sample_tokens,
                stage.patch_size,
            )
        iterator = self._iterator(self._dataset(stage), consumed, stage.micro_batch_size)
        flops_per_step = self.flops_per_position * stage.positions_per_step
        window_seconds, window_steps, skipped = 0.0, 0, 0
        while stage_iteration < stage.iterations:
            step_start = time.perf_counter()
            iteration = self._iteration = stage.first_iteration + stage_iteration + 1
            with self.profiler.step(iteration):
                loss, grad_norm, was_skipped = train_step(self.model, self.optimizer, self.scheduler, iterator, stage)
            self.manual_gc.after_step(iteration)  # timed with the step
            torch.cuda.synchronize()  # the optimizer's kernels, queued after its last host sync, end in the step's time
            stage_iteration += 1
            consumed += stage.samples_per_step
            skipped += int(was_skipped)
            elapsed = time.perf_counter() - step_start
            result.iterations += 1
            result.tokens += stage.tokens_per_step
            result.flops += flops_per_step
            result.seconds += elapsed
            result.last_loss = loss
            window_steps += 1
            window_seconds += elapsed
            if stage_iteration % log.log_interval == 0 or stage_iteration == stage.iterations:
                self._update_peak_memory(result)
                self.metrics.log_step(
                    stage=stage.name,
                    iteration=iteration,
                    stage_iteration=stage_iteration,
                    stage_iters=stage.iterations,
                    patch_size=stage.patch_size,
                    tokens=result.tokens,
                    run_tokens=sum(r.tokens for r in self.results),
                    loss=loss,
                    lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=grad_norm,
                    skipped=skipped,
                    tokens_per_s=window_steps * stage.tokens_per_step / window_seconds,
                    tflops_per_gpu=window_steps * flops_per_step / window_seconds / 1e12 / dist.get_world_size(),
                    peak_tflops=self.peak_tflops,
                    peak_memory=result.peak_memory_gib,
                )
                window_seconds, window_steps = 0.0, 0
            if self.pending_save is not None:
                self.pending_save.poll()
            stop = self._stop_flag()
            # a stop saves first, without validating (one during a validation cuts it short)
            validated = bool(log.eval_interval and iteration % log.eval_interval == 0 and not stop)
            try:
                if validated:
                    self.metrics.log_valid(stage.name, iteration, self._validate())
                if stage_iteration == stage.iterations and not stop:
                    self._close_stage(stage, result, validated)  # before the stage's last save, which records it
            except ValidationStopped:
                stop = True  # a stage's last step: the resumed run validates these weights
            if stop or stage_iteration == stage.iterations:
                self._update_peak_memory(result)  # the stage's peak, in its last checkpoint's record
            if stop or stage_iteration == stage.iterations or (save_interval and iteration % save_interval == 0):
                last = stop or iteration == self.plan.stage_ends[-1]
                self._save(iteration, stage, stage_iteration, consumed, self.results, background=not last)
                if not last:  # a stop asked for while saving: this checkpoint is the one to resume from
                    stop = self._stop_flag()
            if stop:
                self._log_stop(iteration)
                return True
        return False

    def _log_stop(self, iteration: int) -> None:
        logger.warning(
            "stopped by %s at iteration %d; resume with --load %s",
            self.stop.requested or "a stop on another rank",
            iteration,
            self.config.checkpoints.save,
        )

    def _close_stage(self, stage: StagePlan, result: StageResult, validated: bool) -> None:
        """The stage's closing validation; ``validated``: its last step's interval validation just ran."""
        if validated:
            result.valid_loss = self.metrics.last_valid_loss
        else:
            result.valid_loss = self._validate()
            self.metrics.log_valid(stage.name, stage.first_iteration + stage.iterations, result.valid_loss)

    def _summary(self, results, interrupted: bool) -> dict:
        if self.pending_save is not None:
            self.pending_save.wait()
        epochs = self.plan.epochs(stage_data_tokens(self.datasets.splits), {r.name: r.tokens for r in results})
        for r in results:
            r.epochs = epochs.get(r.name)
        logger.info(
            "--stage-split %s: %s",
            self.plan.stage_split,
            ", ".join(f"{r.name} stage saw {r.epochs:.3f} epochs" for r in results if r.epochs is not None),
        )
        summary = run_summary(
            results, self.plan, self.flops_per_position, self.datasets.train_tokens, interrupted, self.peak_tflops
        )
        self.metrics.log_summary(summary)
        return summary
