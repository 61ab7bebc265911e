"""Training order and augmentation randomness as pure functions of ``(train.seed, epoch)``.

Why: a DataLoader worker's random state lives in the worker.  With persistent workers it carries over from one
epoch to the next, so a run restarted at epoch k (fresh workers) would augment differently from an unbroken run,
and results would depend on ``num_workers``.  :class:`EpochSeededSampler` instead hands every sample a seed along
with its index (a :class:`SampleKey`), drawn from ``(seed, epoch)`` in the main process; datasets build their
augmentation RNG from it with :func:`sample_rng` / :func:`sample_random`.  Resume is then exact whatever the
number of workers, persistence or (under DDP, where Lightning forwards ``set_epoch``) the number of ranks.
"""
from __future__ import annotations

import bisect
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Sampler

__all__ = ["SampleKey", "EpochSeededSampler", "KeyedConcatDataset", "sample_rng", "sample_random", "run_seed", "private_generator", "training_sampler"]

_SEED_SPACE = 2**63 - 1


class SampleKey(int):
    """A dataset index (an ``int``, so plain datasets accept it) that carries the sample's random seed."""

    seed: int

    def __new__(cls, index: int, seed: int) -> SampleKey:
        key = super().__new__(cls, index)
        key.seed = int(seed)
        return key

    def __getnewargs__(self) -> tuple[int, int]:  # keys are pickled to DataLoader workers
        return int(self), self.seed

    def __repr__(self) -> str:
        return f"SampleKey({int(self)}, seed={self.seed})"


def run_seed(seed: int) -> int:
    """``seed`` when it is ≥ 0 (``train.seed``); otherwise a fresh random seed (the run is not reproducible)."""
    seed = int(seed)
    return seed if seed >= 0 else int(torch.randint(0, 2**62, (1,)).item())


class EpochSeededSampler(Sampler[SampleKey]):
    """Every index of a dataset of ``size`` once per epoch, as :class:`SampleKey`\\ s.

    The order (shuffled or ascending) and each sample's seed depend only on ``(seed, epoch)``; Lightning calls
    :meth:`set_epoch` before each training epoch (also through its distributed wrapper), including the first
    epoch after a resume.
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool = True):
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order and seeds of epoch ``epoch`` (0-based)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[SampleKey]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        seeds = rng.integers(0, _SEED_SPACE, size=self.size, dtype=np.int64)
        return (SampleKey(int(i), int(s)) for i, s in zip(order, seeds, strict=True))


class KeyedConcatDataset(ConcatDataset):
    """``ConcatDataset`` that passes a :class:`SampleKey`'s seed on to the part it selects (the base class turns
    keys into plain ints)."""

    def __getitem__(self, key: int):
        index = int(key)
        if index < 0:
            index += len(self)
        part = bisect.bisect_right(self.cumulative_sizes, index)
        local = index - (self.cumulative_sizes[part - 1] if part else 0)
        if isinstance(key, SampleKey):
            local = SampleKey(local, key.seed)
        return self.datasets[part][local]


def _seed_of(key: int) -> int:
    # A plain index (evaluation, `tao dataset browse`) gets a seed fixed by the index, so reading a sample never
    # draws from a global RNG: in the main process (0 workers) that draw would shift the model's random numbers.
    return key.seed if isinstance(key, SampleKey) else int(key)


def sample_rng(key: int) -> np.random.Generator:
    """NumPy generator for the sample ``key``: its own seed for a :class:`SampleKey`, the index otherwise."""
    return np.random.default_rng(_seed_of(key))


def sample_random(key: int) -> random.Random:
    """``random.Random`` for the sample ``key``: its own seed for a :class:`SampleKey`, the index otherwise."""
    return random.Random(_seed_of(key))


def private_generator(seed: int = 0) -> torch.Generator:
    """A generator for one DataLoader's own draws (its workers' base seed).

    Without one, every new loader iterator draws that seed from torch's global RNG, which the model's own
    randomness (dropout, point sampling, denoising queries) also uses: a persistent-worker loader draws it once per
    run, so a resumed run would draw once more than an unbroken one and every later random number would differ.
    """
    return torch.Generator().manual_seed(int(seed))


def training_sampler(size: int, seed: int, trainer=None) -> EpochSeededSampler:
    """A shuffling :class:`EpochSeededSampler` for ``train.seed`` (see :func:`run_seed`), already set to the
    epoch ``trainer`` is about to run.

    Why set it here: Lightning creates the first iterator of a fit (which, with workers, prefetches batches at
    once) before it calls ``set_epoch``, so a run resumed at epoch k would otherwise load its first batches in
    epoch 0's order.  The value is the one Lightning passes to ``set_epoch`` (epochs processed so far).
    """
    sampler = EpochSeededSampler(size, seed=run_seed(seed))
    if trainer is not None:
        sampler.set_epoch(int(trainer.fit_loop.epoch_progress.current.processed))
    return sampler
