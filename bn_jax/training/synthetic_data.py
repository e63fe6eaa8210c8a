r"""Synthetic Gaussian classification data (for the deep linear network).

Santurkar et al. (2018) train a deep linear network on synthetic Gaussian
data. Here: inputs :math:`x \sim \mathcal N(0, I_d)` (stored as ``[n, 1, 1, d]``
"images" so every model can take them), labels from a fixed random linear
teacher :math:`y = \arg\max_k (x W + \sigma \varepsilon)_k` with
:math:`W_{jk} \sim \mathcal N(0, 1)` and label noise
:math:`\varepsilon \sim \mathcal N(0, I)` scaled by ``noise``. The teacher
depends only on ``seed``, so train and test splits share it; the inputs of
the two splits are drawn from different keys. Already standardized: no
further normalization is applied.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np


NAME = "synthetic_gaussian"  # config.dataset of this data


class SyntheticDataset(NamedTuple):
  """Same fields as ``bn_jax.data.ArrayDataset`` (images are float32)."""
  images: np.ndarray   # float32 [n, 1, 1, dim]
  labels: np.ndarray   # int32 [n]
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  name: str


def synthetic_gaussian(split: str, *, num_train: int, num_test: int, dim: int,
                       num_classes: int, noise: float = 0.0,
                       seed: int = 0) -> SyntheticDataset:
  """The ``'train'`` or ``'test'`` split (deterministic in ``seed``)."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  teacher = np.random.default_rng([seed, 0]).standard_normal(
      (dim, num_classes))
  n = num_train if split == "train" else num_test
  rng = np.random.default_rng([seed, 1 if split == "train" else 2])
  x = rng.standard_normal((n, dim))
  scores = x @ teacher + noise * rng.standard_normal((n, num_classes))
  return SyntheticDataset(
      images=x.reshape(n, 1, 1, dim).astype(np.float32),
      labels=np.argmax(scores, axis=-1).astype(np.int32),
      num_classes=num_classes, mean=np.zeros(dim, np.float32),
      std=np.ones(dim, np.float32), name=NAME)


def synthetic_batches(ds: SyntheticDataset, batch_size: int, *, seed: int,
                      epoch: int, shuffle: bool = True,
                      remainder: str = "drop") -> Iterator[dict]:
  """Batches ``{'image', 'label', 'mask'}`` as ``bn_jax.data.epoch_batches``.

  The order is a function of ``(seed, epoch)``; ``remainder='pad'`` pads the
  last batch with zeros and ``mask=False``, ``'drop'`` drops it, ``'keep'``
  yields it short.
  """
  n = len(ds.labels)
  order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
           else np.arange(n))
  for start in range(0, n, batch_size):
    idx = order[start:start + batch_size]
    size = len(idx)
    if size < batch_size and remainder == "drop":
      return
    images, labels = ds.images[idx], ds.labels[idx]
    mask = np.ones(size, bool)
    if size < batch_size and remainder == "pad":
      pad = batch_size - size
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:],
                                                images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, bool)])
    yield {"image": images, "label": labels, "mask": mask}
