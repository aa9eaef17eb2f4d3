"""Batch samplers: m-per-class batches (the pair and proxy losses' usual recipe) and random batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class MPerClassSampler(Sampler[list[int]]):
    """Batches of ``batch_size // m`` distinct classes with ``m`` samples each.

    An epoch yields ``len(labels) // batch_size`` batches; classes are drawn so that
    each appears about equally often, samples without replacement unless a class has
    fewer than ``m``. Deterministic for a given ``seed`` and ``set_epoch`` value.
    """

    def __init__(self, labels: np.ndarray, m: int, batch_size: int, seed: int):
        if m < 1 or batch_size % m:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of m ({m})")
        self.classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
        self.per_class = batch_size // m
        if len(self.classes) < self.per_class:
            raise ValueError(f"a batch needs {self.per_class} classes but the data has {len(self.classes)}")
        self.members = [np.flatnonzero(inverse == c) for c in range(len(self.classes))]
        self.m, self.batch_size, self.seed, self.epoch = m, batch_size, seed, 0
        self.num_batches = max(1, len(inverse) // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order: list[int] = []
        for _ in range(self.num_batches):
            if len(order) < self.per_class:  # refill with a fresh permutation of all classes
                fresh = [c for c in rng.permutation(len(self.classes)) if c not in order]
                order.extend(fresh)
            chosen, order = order[: self.per_class], order[self.per_class :]
            batch = []
            for c in chosen:
                members = self.members[c]
                batch.extend(rng.choice(members, size=self.m, replace=len(members) < self.m).tolist())
            yield batch


class RandomBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` samples drawn without replacement from a fresh permutation each
    epoch (SoftTriple's recipe: no class structure in the batch); the last partial batch is
    dropped. Deterministic for a given ``seed`` and ``set_epoch`` value."""

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        if num_samples < batch_size:
            raise ValueError(f"a batch needs {batch_size} samples but the data has {num_samples}")
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, 0
        self.num_batches = num_samples // batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples)
        for b in range(self.num_batches):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
