"""Datasets and batch iterators for training, from a config.

The training data order is a pure function of ``(config.seed, step)``: batch
``t`` (0-based) is batch ``t mod S`` of epoch ``t // S`` (``S`` full batches
per epoch, the remainder dropped), each epoch shuffled by
``(seed, epoch)``. Resuming at step ``t`` regenerates the same epoch and skips
its first ``t mod S`` batches, so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""
from __future__ import annotations

import itertools
from typing import Iterator

from bn_jax.training.synthetic_data import (SyntheticDataset,
                                            synthetic_batches,
                                            synthetic_gaussian)


def load_train_test(config):
  """``(train_ds, test_ds)`` named by ``config.dataset``."""
  if config.dataset == "synthetic_gaussian":
    kwargs = dict(config.synthetic)
    return tuple(synthetic_gaussian(split, seed=config.seed, **kwargs)
                 for split in ("train", "test"))
  from bn_jax.data import load_dataset
  data_dir = config.data_dir or None
  return tuple(load_dataset(config.dataset, split, data_dir=data_dir,
                            source=config.data_source)
               for split in ("train", "test"))


def epoch_iterator(ds, batch_size: int, *, seed: int, epoch: int,
                   shuffle: bool, augment: bool, remainder: str):
  """One epoch of batches of ``ds`` (bn_jax.data or synthetic)."""
  if isinstance(ds, SyntheticDataset):
    return synthetic_batches(ds, batch_size, seed=seed, epoch=epoch,
                             shuffle=shuffle, remainder=remainder)
  from bn_jax.data import epoch_batches
  return epoch_batches(ds, batch_size, seed=seed, epoch=epoch,
                       shuffle=shuffle, augment=augment, remainder=remainder)


def steps_per_epoch(ds, batch_size: int) -> int:
  """Full batches per epoch; ValueError naming config.batch_size if none."""
  n = len(ds.labels)
  if batch_size > n:
    raise ValueError(f"config.batch_size={batch_size} is larger than the "
                     f"{n} training examples of {ds.name}.")
  return n // batch_size


def train_iterator(ds, config, *, start_step: int = 0,
                   seed_offset: int = 0) -> Iterator[dict]:
  """Endless training batches starting at ``start_step`` (see module doc)."""
  per_epoch = steps_per_epoch(ds, config.batch_size)
  epoch, skip = divmod(start_step, per_epoch)
  seed = config.seed + seed_offset
  while True:
    batches = epoch_iterator(ds, config.batch_size, seed=seed, epoch=epoch,
                             shuffle=True, augment=config.augment,
                             remainder="drop")
    if skip:
      batches = itertools.islice(batches, skip, None)
      skip = 0
    yield from batches
    epoch += 1


def eval_iterator(ds, config) -> Iterator[dict]:
  """The whole test set once, in order, the last batch padded and masked."""
  return epoch_iterator(ds, config.eval_batch_size, seed=0, epoch=0,
                        shuffle=False, augment=False, remainder="pad")
