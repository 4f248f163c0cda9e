"""Micro-batch iterators over the stage datasets, resumable at any consumed-sample count.

A global batch of G sequences is read as consecutive sample indices
``[consumed, consumed + G)``; within it, micro-batch m of data-parallel rank r takes
``consumed + m*b*dp + r*b + [0, b)`` (Megatron's pretraining sampler order), so the samples a
step trains on do not depend on the parallel layout.
"""

import functools
import signal
from typing import Iterator, List, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class PretrainingBatchSampler(Sampler[List[int]]):
    """Yields this data-parallel rank's micro-batches of sample indices, from ``consumed_samples`` on.

    Args:
        total_samples: samples in the dataset; reading past it is an error (the dataset is built
            for the stage's budget).
        consumed_samples: samples (all ranks together) already trained on.
        micro_batch_size: b, sequences per micro-batch.
        data_parallel_rank, data_parallel_size: this rank's place among the replicas.
    """

    def __init__(self, total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size):
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.size = data_parallel_size

    def __len__(self):
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.size)

    def __iter__(self):
        per_replica_step = self.micro_batch_size * self.size
        start = self.consumed_samples
        while start + per_replica_step <= self.total_samples:
            first = start + self.rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += per_replica_step


def _collate(samples):
    keys = ("tokens", "labels", "loss_mask")
    return {key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]) for key in keys}


def _ignore_stop_signals(signals: Sequence[signal.Signals], worker_id: int) -> None:
    """``worker_init_fn``: a data worker ignores the trainer's stop signals. A job-wide SIGTERM
    (scancel, a SLURM time limit) reaches the workers too, and torch's own handler there ends a
    worker signalled by anyone but the trainer, which then raises in the middle of the step or of
    the stop's save. The workers still end with the trainer (torch watches its parent)."""
    for number in signals:
        signal.signal(number, signal.SIG_IGN)


def micro_batches(
    dataset: Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    stop_signals: Sequence[signal.Signals] = (),
) -> Iterator[dict]:
    """An iterator of ``{tokens, labels, loss_mask}`` micro-batches, each ``[b, L]`` (L tokens).

    The loader gets a generator of its own: creating an iterator draws a base seed for the worker
    processes, and drawing it from the global CPU generator would leave a resumed run's RNG one
    draw away from the uninterrupted run's (the samples do not depend on it: the sampler is
    deterministic and the datasets do no random augmentation). Its worker processes ignore
    ``stop_signals``, which the trainer handles.
    """
    sampler = PretrainingBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=functools.partial(_ignore_stop_signals, tuple(stop_signals)),
    )
    return iter(loader)
