"""The trainer's configuration: the run plan and one frozen settings object per concern.

Built once from the checked flags by ``arguments.make_config``; the trainer, the builders, the
data and the metrics read these, never the flags.
"""

import signal
from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_patch.architecture.build import ModelSettings
from megatron_patch.training.plan import RunPlan


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam(W), its LR schedule (restarted in each stage) and gradient clipping."""

    lr: float
    min_lr: float
    warmup_iters: int  # per stage
    decay_style: str  # constant | linear | cosine | inverse-square-root
    weight_decay: float
    clip_grad: float  # 0: no clipping
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    torch_adam_impl: str  # foreach | fused (torch's AdamW, megatron's fallback without TE/Apex)
    bf16: bool
    distributed: bool  # megatron's distributed optimizer


@dataclass(frozen=True)
class DataSettings:
    """Where the training text comes from."""

    data_path: Tuple[str, ...]  # a prefix, or weight/prefix pairs
    split: str  # train,valid,test shares of the documents
    tokenizer_model: str
    cache_dir: Optional[str]
    num_workers: int


@dataclass(frozen=True)
class CheckpointSettings:
    save: Optional[str]
    load: Optional[str]
    save_interval: Optional[int]  # steps
    keep_last: int  # 0: keep all
    pretrained_checkpoint: Optional[str]  # --stage token: initial weights only
    verify: bool = True  # check every file against the manifest before loading
    exit_signals: Tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)  # save, then exit 0
    exit_duration_minutes: Optional[float] = None  # save, then exit 0, after a step ending this late
    fully_parallel_save: bool = True  # data-parallel replicas share the writing of replicated shards
    fully_parallel_load: bool = False  # ... and the reading, exchanging what they read
    async_save: bool = False  # interval saves written by a forked process while training goes on
    lock_wait_seconds: float = 0.0  # for the --save lock held by another host (a failed node's)

    @property
    def stop_signals(self) -> Tuple[signal.Signals, ...]:
        """The signals that stop the run with a checkpoint: ``exit_signals``, or none without
        ``--save``: nothing could be saved, so a signal ends the run as it ends any program, with a
        status that tells the scheduler the run did not finish."""
        return self.exit_signals if self.save else ()


@dataclass(frozen=True)
class LogSettings:
    log_interval: int  # steps
    eval_interval: Optional[int]  # steps
    tensorboard_dir: Optional[str]
    summary_json: Optional[str]
    wandb_project: Optional[str] = None  # W&B on when given
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None  # default: <--save>/wandb


@dataclass(frozen=True)
class ProfileSettings:
    """``--profile``: global iterations ``[first_step, end_step)`` on ``ranks``, traces into ``folder``."""

    first_step: int
    end_step: int
    ranks: Tuple[int, ...]
    folder: str


@dataclass(frozen=True)
class TrainerConfig:
    """Everything one trainer process needs; ``flags`` are the flags as given plus the values they
    resolved to (recorded in every checkpoint's metadata, read by the tools)."""

    flags: dict
    plan: RunPlan
    model: ModelSettings
    optimizer: OptimizerSettings
    data: DataSettings
    checkpoints: CheckpointSettings
    logging: LogSettings
    cpu: bool
    seed: int
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    profile: Optional[ProfileSettings] = None  # --profile
    manual_gc_interval: Optional[int] = None  # --manual-gc: steps between collections (0: start only); None: off
