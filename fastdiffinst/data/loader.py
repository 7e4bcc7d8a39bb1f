"""Samplers and data loaders for training and evaluation, one process or many (DDP).

* :class:`TrainingSampler` — an infinite stream of shuffled indices; each rank takes every
  ``world_size``-th index of the same stream, so ranks see disjoint samples of one permutation.
* :class:`RepeatFactorTrainingSampler` — LVIS's repeat-factor sampling: image i repeats
  ``r_i = max over its classes c of max(1, sqrt(t / f_c))`` times per epoch (``f_c`` the fraction of
  images containing c, ``t = 0.001``), with stochastic rounding each epoch.
* :class:`InferenceSampler` — contiguous shards of ``range(size)``, one per rank.

:func:`train_loader` is the training stream: any of these samplers, each sample augmented with a
generator seeded by its position in the stream (so runs resume exactly, with or without workers).
Batches are lists of samples (:func:`collate`): the model pads images to a multiple of 32 and keeps
the unpadded sizes (``DiffusionInst.preprocess``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def collate(samples: list[dict]) -> list[dict]:
    return samples


def derived_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded by ``seed`` modulo 2^64, the way ``torch.Generator.manual_seed`` reads a
    negative seed: the seeds derived from ``solver.seed`` (any value in [-2^63, 2^64)) and a position
    or an iteration stay valid however large they grow."""
    return torch.Generator().manual_seed(seed % 2**64)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
    return rank, world_size


class TrainingSampler(Sampler[int]):
    """Infinite shuffled indices of ``range(size)`` (the same permutations on every rank, seeded)."""

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size {size}")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = _rank_world(rank, world_size)

    def _indices(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from (torch.randperm(self.size, generator=generator) if self.shuffle
                        else torch.arange(self.size)).tolist()

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._indices(), self.rank, None, self.world_size)


def repeat_factors(image_labels: Sequence[set[int]], threshold: float = 0.001) -> torch.Tensor:
    """Per-image repeat factors from the classes each image contains (detectron2
    ``repeat_factors_from_category_frequency``); an image without labels repeats once."""
    counts: dict[int, int] = {}
    for labels in image_labels:
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
    total = len(image_labels)
    per_class = {c: max(1.0, math.sqrt(threshold / (n / total))) for c, n in counts.items()}
    return torch.tensor([max((per_class[c] for c in labels), default=1.0) for labels in image_labels])


class RepeatFactorTrainingSampler(Sampler[int]):
    """Infinite indices with image i drawn ``floor(r_i)`` or ``ceil(r_i)`` times per epoch
    (stochastic rounding), shuffled, split over ranks like :class:`TrainingSampler`."""

    def __init__(self, factors: torch.Tensor, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if factors.numel() == 0 or bool((factors < 1).any()):
            raise ValueError("repeat factors must be a non-empty tensor of values >= 1")
        self.integer, self.fraction = torch.trunc(factors), factors - torch.trunc(factors)
        self.seed = seed
        self.rank, self.world_size = _rank_world(rank, world_size)

    def _indices(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            reps = self.integer + (torch.rand(self.fraction.shape, generator=generator) < self.fraction)
            epoch = torch.repeat_interleave(torch.arange(len(reps)), reps.long())
            yield from epoch[torch.randperm(len(epoch), generator=generator)].tolist()

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._indices(), self.rank, None, self.world_size)


class InferenceSampler(Sampler[int]):
    """Rank ``rank``'s contiguous shard of ``range(size)`` (shards differ by at most one)."""

    def __init__(self, size: int, rank: int | None = None, world_size: int | None = None) -> None:
        self.rank, self.world_size = _rank_world(rank, world_size)
        shard, extra = divmod(size, self.world_size)
        start = self.rank * shard + min(self.rank, extra)
        self.indices = list(range(start, start + shard + (self.rank < extra)))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class AugmentedSamples(Dataset):
    """``dataset`` items keyed by ``(position, index)``: the augmentation of the sample at
    ``position`` in the training stream draws from a generator seeded by ``(seed, position)``, so
    it depends neither on the workers nor on where a run was resumed."""

    def __init__(self, dataset: Dataset, make_transform: Callable[[torch.Generator], Callable[[dict], dict]] | None,
                 seed: int) -> None:
        self.dataset, self.make_transform, self.seed = dataset, make_transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        position, index = key
        sample = self.dataset[index]
        if self.make_transform is None:
            return sample
        return self.make_transform(derived_generator(self.seed * 1_000_003 + position))(sample)


class PositionedSampler(Sampler[tuple[int, int]]):
    """``(position, index)`` pairs of a training stream (an infinite sampler), from ``start`` on."""

    def __init__(self, sampler: Sampler[int], start: int = 0) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        stream = iter(self.sampler)
        for _ in range(self.start):
            next(stream)
        yield from enumerate(stream, start=self.start)


def train_loader(dataset: Dataset, batch_size: int,
                 make_transform: Callable[[torch.Generator], Callable[[dict], dict]] | None = None,
                 sampler: Sampler[int] | None = None, seed: int = 0, start: int = 0,
                 num_workers: int = 0) -> DataLoader:
    """An infinite loader of ``batch_size``-sample lists (:func:`collate`) from ``sampler`` (default
    :class:`TrainingSampler`), its first ``start`` samples skipped (resuming), each sample augmented
    by ``make_transform(generator)`` with a generator seeded by its position in the stream."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = sampler if sampler is not None else TrainingSampler(len(dataset), seed=seed)
    # The loader's own generator: starting an iterator draws the workers' base seed from it, which
    # must neither consume nor depend on the global generator's state.
    return DataLoader(AugmentedSamples(dataset, make_transform, seed), batch_size=batch_size,
                      sampler=PositionedSampler(sampler, start), num_workers=num_workers, collate_fn=collate,
                      persistent_workers=num_workers > 0, generator=derived_generator(seed))
