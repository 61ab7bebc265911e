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
import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler

__all__ = ["SampleKey", "EpochSeededSampler", "KeyedConcatDataset", "sample_rng", "sample_random", "run_seed", "private_generator",
           "seeded_globals", "DeferredStartLoader", "training_loader"]

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


@contextlib.contextmanager
def seeded_globals(key: int) -> Iterator[None]:
    """Run the block with torch's CPU generator, ``numpy.random`` and ``random`` seeded from the sample ``key``,
    and put their previous states back afterwards.

    For transforms that draw from the global generators (torchvision's random transforms, legacy
    ``np.random`` code): their draws become a function of the key, and the caller's streams — the model's, when
    samples are read in the main process — are left exactly as they were.  CUDA generators are not touched.
    """
    seed = _seed_of(key)
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


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


class _DeferredIterator:
    """Calls ``start()`` (the real DataLoader iterator) at the first ``next()``."""

    def __init__(self, start):
        self._start = start
        self._iterator = None

    def __iter__(self) -> _DeferredIterator:
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)


class DeferredStartLoader(DataLoader):
    """A DataLoader whose iteration — worker start, prefetching, and so the sampler's order — begins when the
    first batch is requested, not when ``iter()`` is called.

    Why: Lightning calls ``iter()`` on the train loader early — in ``estimated_stepping_batches`` (schedules
    built in ``configure_optimizers``, before a resumed run's epoch counter is restored) and before each fit's
    first ``set_epoch``.  A plain loader with workers prefetches at that moment, in epoch 0's order; this one
    starts after ``set_epoch``, so a run resumed at epoch k loads epoch k's order.  (Lightning's fetcher does not
    prefetch a loader that has a length, so nothing else pulls a batch early.)
    """

    def __iter__(self):
        return _DeferredIterator(super().__iter__)


def training_loader(dataset, *, batch_size: int, seed: int, num_workers: int, collate_fn=None,
                    drop_last: bool = False, pin_memory: bool = False,
                    persistent_workers: bool | None = None) -> DeferredStartLoader:
    """The training DataLoader every network uses: an :class:`EpochSeededSampler` for ``train.seed`` (shuffled,
    per-sample seeds), a private generator, and a deferred start; ``persistent_workers`` defaults to
    ``num_workers > 0``.  Resume is then exact (see the module docstring)."""
    workers = int(num_workers)
    return DeferredStartLoader(
        dataset, batch_size=int(batch_size), sampler=EpochSeededSampler(len(dataset), seed=run_seed(seed)),
        num_workers=workers, collate_fn=collate_fn, drop_last=bool(drop_last), pin_memory=bool(pin_memory),
        generator=private_generator(), persistent_workers=workers > 0 if persistent_workers is None
        else bool(persistent_workers))
