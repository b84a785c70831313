"""Deterministic, resumable data loading for training.

* :class:`ResumableDistributedSampler` is :class:`torch.utils.data.DistributedSampler` (same per-epoch permutation
  from ``seed + epoch``, same rank striding and padding; ``set_epoch`` every epoch) that can start part-way into an
  epoch (mid-epoch resume) and tags every index with its epoch.
* :class:`SeededDataset` calls the dataset's ``set_epoch(epoch)`` (when it has one) and seeds python/numpy/torch
  global RNGs from ``(seed, epoch, index)`` around each ``__getitem__``, so
  random augmentation of a sample does not depend on the worker count, the worker that loads it, or on a resume.
  Global RNG states are restored afterwards (nothing leaks into the main process when ``workers == 0``).
"""
from __future__ import annotations

import contextlib
import random
import signal
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableDistributedSampler", "SeededDataset", "sample_seed", "build_train_loader", "move_to_device",
           "shutdown_loader_workers"]


class ResumableDistributedSampler(DistributedSampler):
    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, tag_epoch: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0
        self.tag_epoch = tag_epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        """Select the epoch's permutation; skip this rank's first ``start`` samples (mid-epoch resume)."""
        super().set_epoch(epoch)
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"sampler start {start} outside [0, {self.num_samples}]")
        self.start = int(start)

    def __iter__(self) -> Iterator:
        idx = list(super().__iter__())[self.start:]
        if self.tag_epoch:
            return iter([(self.epoch, i) for i in idx])
        return iter(idx)

    def __len__(self) -> int:
        return self.num_samples - self.start


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """32-bit seed for one sample in one epoch (independent streams via numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, index & 0xFFFFFFFF])
               .generate_state(1)[0])


@contextlib.contextmanager
def _seeded_rng(s: int):
    py, npst, tst = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npst)
        torch.set_rng_state(tst)


class SeededDataset(Dataset):
    """Wraps a map-style dataset; accepts ``(epoch, index)`` keys from the sampler (plain ints too)."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):  # datasets with their own (seed, epoch, index) RNG, e.g. KittiDataset; runs in the
            set_epoch(int(epoch))  # worker, so persistent workers' dataset copies see the right epoch
        with _seeded_rng(sample_seed(self.seed, int(epoch), int(index))):
            return self.dataset[int(index)]

    def __getattr__(self, name):  # forward dataset attributes (e.g. class names) to the wrapped dataset
        if name == "dataset" or name.startswith("__"):  # never forward dunders (e.g. __getitems__ bypasses seeding)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _worker_init(_worker_id: int) -> None:
    """DataLoader workers ignore SIGINT: a Ctrl-C reaches the whole foreground process group, the trainer turns it
    into a clean stop + save, and a worker killed by it would abort that.  SIGTERM keeps its default action
    (multiprocessing terminates workers with it; torchrun/timeout signal the trainer process, not its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(dataset: Dataset, batch_size: int, sampler: ResumableDistributedSampler, *,
                       collate_fn: Optional[Callable] = None, workers: int = 0, pin_memory: bool = False,
                       drop_last: bool = False) -> DataLoader:
    # own generator: creating a loader iterator would otherwise draw its worker base seed from the global torch RNG,
    # so a mid-epoch resume (new iterator at a different point) would shift the model's random stream (dropout, RoI
    # sampling).  Sample randomness comes from SeededDataset, so this generator's value does not matter.
    kw = {"generator": torch.Generator().manual_seed(0)}
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=2, worker_init_fn=_worker_init)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, drop_last=drop_last, **kw)


def shutdown_loader_workers(loader: DataLoader) -> None:
    """Stop a DataLoader's persistent workers now (otherwise they live until garbage collection/interpreter exit)."""
    it = getattr(loader, "_iterator", None)
    if it is not None:
        shut = getattr(it, "_shutdown_workers", None)
        if callable(shut):
            shut()
        loader._iterator = None


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Default batch preparation: move every tensor of a nested dict/list/tuple to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_to_device(v, device) for v in batch]
    if isinstance(batch, tuple):
        return tuple(move_to_device(v, device) for v in batch)
    return batch
