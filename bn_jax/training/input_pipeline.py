"""Datasets and batch iterators for training, from a config.

The training data order is a pure function of ``(config.seed, step)``: batch
``t`` (0-based) is batch ``t mod S`` of epoch ``t // S`` (``S`` full batches
per epoch, the remainder dropped), each epoch shuffled by
``(seed, epoch)``. Resuming at step ``t`` regenerates the same epoch and skips
its first ``t mod S`` batches, so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import numpy as np

from bn_jax.training import synthetic_data
from bn_jax.training.synthetic_data import (SyntheticDataset,
                                            synthetic_batches,
                                            synthetic_gaussian)


def load_train_test(config):
  """``(train_ds, test_ds)`` named by ``config.dataset``."""
  if config.dataset == synthetic_data.NAME:
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


# ---------------------------------------------------------------------------
# Subsets, and data kept on the device (no augmentation).

def select_examples(ds, index: np.ndarray):
  """``ds`` (an ``ArrayDataset`` or ``SyntheticDataset``) restricted to the
  examples ``index``; everything else (normalization statistics, name,
  split) stays."""
  if hasattr(ds, "_replace"):
    return ds._replace(images=ds.images[index], labels=ds.labels[index])
  return dataclasses.replace(ds, images=ds.images[index],
                             labels=ds.labels[index])


def subset(ds, num: int, seed: int = 0):
  """The first ``num`` examples of a random permutation (fixed by seed) of
  ``ds`` (in their original order); ``num <= 0`` keeps everything.

  The per-channel normalization statistics stay those of the full train set.
  """
  if num <= 0 or num >= len(ds.labels):
    return ds
  index = np.sort(np.random.default_rng(seed).permutation(len(ds.labels))[
      :num])
  return select_examples(ds, index)


def first_examples(ds, num: int):
  """The first ``num`` examples of ``ds``; ``num <= 0`` keeps everything."""
  if num <= 0 or num >= len(ds.labels):
    return ds
  return select_examples(ds, np.arange(num))


def to_device(batch: dict) -> dict:
  """A host batch's ``image`` and ``label`` as device arrays."""
  import jax.numpy as jnp
  return {"image": jnp.asarray(batch["image"]),
          "label": jnp.asarray(batch["label"])}


def epoch_index_batches(num_examples: int, batch_size: int, *, seed: int,
                        start_step: int = 0) -> Iterator[np.ndarray]:
  """Endless example-index batches in the training order.

  Epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(N)`` cut into
  ``N // batch_size`` batches (remainder dropped): exactly the order of
  :func:`train_iterator` without augmentation
  (tests/test_experiments_bn_santurkar.py checks it).
  """
  per_epoch = num_examples // batch_size
  if per_epoch < 1:
    raise ValueError(f"batch_size={batch_size} is larger than the "
                     f"{num_examples} training examples.")
  epoch, skip = divmod(start_step, per_epoch)
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    for k in range(skip, per_epoch):
      yield order[k * batch_size:(k + 1) * batch_size]
    skip = 0
    epoch += 1


def normalized_arrays(ds):
  """All of ``ds`` normalized as in training (no augmentation), on device:
  ``(images, labels)``."""
  batch = to_device(next(epoch_iterator(
      ds, len(ds.labels), seed=0, epoch=0, shuffle=False, augment=False,
      remainder="keep")))
  return batch["image"], batch["label"]


def fixed_batch(ds, size: int, seed: int = 1234) -> dict:
  """A fixed batch (normalized like training, no augmentation) of ``size``
  examples of ``ds``, on device: a probe / measurement batch."""
  return to_device(next(epoch_iterator(
      ds, size, seed=seed, epoch=0, shuffle=True, augment=False,
      remainder="drop")))


def leading_batches(ds, batch_size: int, limit: int) -> list:
  """The first ``limit // batch_size`` full batches of ``ds`` in order
  (normalized, no augmentation), on device; reused at every evaluation."""
  out = []
  for batch in epoch_iterator(ds, batch_size, seed=0, epoch=0, shuffle=False,
                              augment=False, remainder="drop"):
    if len(out) * batch_size >= limit:
      break
    out.append(to_device(batch))
  return out
