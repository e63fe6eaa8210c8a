"""Input pipeline: per-epoch shuffling, batching, augmentation, prefetching.

Everything on the host is NumPy and deterministic in ``(seed, epoch)``: the
epoch's random numbers come from ``np.random.default_rng([seed, epoch])``,
drawn all at once at the start of the epoch in this order:

  1. the example order, ``rng.permutation(N)`` (when ``shuffle``);
  2. when ``augment``: crop offsets ``rng.integers(0, 2 * 4 + 1, (N, 2))``
     (rows, cols) and flips ``rng.random(N) < 0.5``, indexed by position in
     the epoch (the example at position i of the epoch order gets offsets[i]).

So batch k of an epoch does not depend on how many batches were read before:
``epoch_batches(..., start_batch=k)`` yields exactly the batches k, k+1, ...
of the full epoch (resuming a trainer mid-epoch).

Augmentation (the standard CIFAR one): zero-pad 4 pixels on each side (black
pixels, before normalization, like torchvision's ``RandomCrop(32, padding=4)``
on uint8 images), take an HxW crop at the drawn offset, then flip left-right
when drawn. Shapes are unchanged.

Normalization: ``(x / 255 - mean_c) / std_c`` with the dataset's train-split
statistics, evaluated in float64 through a 256-entry table per channel and
stored as float32; with ``normalize=False`` images are ``x / 255``.
"""
from __future__ import annotations

import collections
import itertools
import numbers
from typing import Any, Iterable, Iterator, Optional, Union

import jax
import numpy as np

from bn_jax.data.datasets import ArrayDataset

REMAINDERS = ("drop", "keep", "pad")
CROP_PADDING = 4

Batch = dict[str, np.ndarray]


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} "
                    f"{value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def num_batches(ds: Union[ArrayDataset, int], batch_size: int,
                remainder: str = "drop") -> int:
  """Batches per epoch: ``N // B`` for 'drop', ``ceil(N / B)`` otherwise.

  Args:
    ds: an ArrayDataset or its number of examples N.
    batch_size: B >= 1.
    remainder: 'drop' | 'keep' | 'pad' (see `epoch_batches`).
  """
  n = len(ds) if isinstance(ds, ArrayDataset) else _check_int("ds", ds, 0)
  batch_size = _check_int("batch_size", batch_size, 1)
  if remainder not in REMAINDERS:
    raise ValueError(f"remainder must be one of {REMAINDERS}, got "
                     f"{remainder!r}")
  return n // batch_size if remainder == "drop" else -(-n // batch_size)


def normalization_table(mean: np.ndarray, std: np.ndarray,
                        normalize: bool = True) -> np.ndarray:
  """float32 [256, C] table: ``(v / 255 - mean_c) / std_c`` for v = 0..255."""
  levels = np.arange(256, dtype=np.float64)[:, None] / 255.0
  if not normalize:
    return np.broadcast_to(levels, (256, len(mean))).astype(np.float32)
  mean = np.asarray(mean, np.float64)
  std = np.asarray(std, np.float64)
  return ((levels - mean) / std).astype(np.float32)


def normalize_images(images: np.ndarray, table: np.ndarray) -> np.ndarray:
  """uint8 [..., C] -> float32 [..., C] through a `normalization_table`."""
  return table[images, np.arange(images.shape[-1])]


def crop_and_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                  padding: int = CROP_PADDING) -> np.ndarray:
  """Random-crop-with-zero-padding and horizontal flip, vectorized.

  out[i, r, c] = padded[i, offsets[i, 0] + r, offsets[i, 1] + c'] with
  c' = W - 1 - c when flips[i] else c, where padded is `images` with
  `padding` zero pixels on each side of H and W.

  Args:
    images: [B, H, W, C] (any dtype; padding value 0).
    offsets: int [B, 2] in [0, 2 * padding] (row, column of the crop's corner
      in the padded image; `padding` means no shift).
    flips: bool [B].
    padding: pixels of zero padding on each side.
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding),
                           (0, 0)))
  rows = offsets[:, 0, None] + np.arange(h)  # [B, H]
  cols = np.where(flips[:, None], np.arange(w - 1, -1, -1), np.arange(w))
  cols = offsets[:, 1, None] + cols  # [B, W]
  return padded[np.arange(b)[:, None, None], rows[:, :, None],
                cols[:, None, :]]


def epoch_batches(ds: ArrayDataset, batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True, augment: bool = False,
                  remainder: str = "drop", normalize: bool = True,
                  start_batch: int = 0) -> Iterator[Batch]:
  """Batches of one epoch, deterministic in ``(seed, epoch)``.

  Args:
    ds: the dataset.
    batch_size: examples per batch, >= 1.
    seed: non-negative int; with `epoch` it fixes order and augmentation.
    epoch: non-negative int; every epoch has its own order.
    shuffle: permute the examples (else the dataset order).
    augment: standard CIFAR augmentation (4-pixel zero pad, random crop back
      to HxW, random horizontal flip); see the module docstring.
    remainder: what to do with the last ``N % batch_size`` examples:
      'drop' them; 'keep' them as a smaller last batch; 'pad' the last batch
      to `batch_size` with zero images and label 0 and ``mask=False`` (exact
      evaluation with a fixed batch shape: average over the mask).
    normalize: ``(x/255 - mean) / std`` (else ``x/255``).
    start_batch: skip the first `start_batch` batches of the epoch without
      computing them (resume mid-epoch; the remaining batches are identical to
      those of the full epoch).

  Yields:
    ``{'image': float32 [B, H, W, C], 'label': int32 [B], 'mask': bool [B]}``.

  Raises:
    TypeError / ValueError (when called, not at the first batch) for bad
    arguments, and when 'drop' would leave an epoch without batches.
  """
  if not isinstance(ds, ArrayDataset):
    raise TypeError("epoch_batches: ds must be an ArrayDataset, got "
                    f"{type(ds).__name__}")
  batch_size = _check_int("batch_size", batch_size, 1)
  seed = _check_int("seed", seed, 0)
  epoch = _check_int("epoch", epoch, 0)
  total = num_batches(ds, batch_size, remainder)
  if total == 0:
    raise ValueError(
        f"epoch_batches: batch_size={batch_size} exceeds the {len(ds)} "
        f"examples of {ds.name}/{ds.split} with remainder='drop': the epoch "
        "would have no batches (use a smaller batch_size or "
        "remainder='keep'/'pad')")
  start_batch = _check_int("start_batch", start_batch, 0)
  if start_batch > total:
    raise ValueError(f"epoch_batches: start_batch={start_batch} exceeds the "
                     f"{total} batches of the epoch")
  for name, flag in (("shuffle", shuffle), ("augment", augment),
                     ("normalize", normalize)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"epoch_batches: {name} must be a bool, got {flag!r}")

  n = len(ds)
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(n) if shuffle else np.arange(n)
  if augment:
    offsets = rng.integers(0, 2 * CROP_PADDING + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
  table = normalization_table(ds.mean, ds.std, normalize)
  return _generate(ds, batch_size, order, offsets if augment else None,
                   flips if augment else None, table, remainder,
                   start_batch, total)


def _generate(ds, batch_size, order, offsets, flips, table, remainder,
              start_batch, total) -> Iterator[Batch]:
  for k in range(start_batch, total):
    positions = slice(k * batch_size, min((k + 1) * batch_size, len(order)))
    index = order[positions]
    images = ds.images[index]
    if offsets is not None:
      images = crop_and_flip(images, offsets[positions], flips[positions])
    images = normalize_images(images, table)
    labels = ds.labels[index]
    mask = np.ones(index.shape[0], bool)
    missing = batch_size - index.shape[0]
    if missing and remainder == "pad":
      images = np.concatenate(
          [images, np.zeros((missing,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(missing, labels.dtype)])
      mask = np.concatenate([mask, np.zeros(missing, bool)])
    yield {"image": images, "label": labels, "mask": mask}


def _device_put(x: np.ndarray, sharding) -> jax.Array:
  if isinstance(sharding, jax.sharding.Sharding):
    if jax.process_count() > 1:
      # Each process holds its own slice of the global batch.
      return jax.make_array_from_process_local_data(sharding, x)
    try:
      sharding.shard_shape(np.shape(x))
    except ValueError as e:
      raise ValueError(
          f"prefetch_to_device: an array of shape {np.shape(x)} cannot be "
          f"split by {sharding} (the batch size must be divisible by the "
          "number of devices along the batch axis; use remainder='drop' or "
          "'pad' with a divisible batch_size)") from e
  return jax.device_put(x, sharding)


def prefetch_to_device(iterator: Iterable[Any], size: int = 2,
                       sharding: Optional[Union[jax.sharding.Sharding,
                                                jax.Device]] = None
                       ) -> Iterator[Any]:
  """Keeps `size` batches in flight to the device(s) ahead of the consumer.

  Like flax's ``jax_utils.prefetch_to_device`` but for `jax.sharding`:
  ``jax.device_put`` is asynchronous, so keeping a queue of `size` already
  dispatched transfers overlaps the host-to-device copy of the next batches
  with the computation on the current one.

  Args:
    iterator: yields pytrees of host arrays (e.g. `epoch_batches`).
    size: number of batches on their way to the device(s), >= 1.
    sharding: where to put every leaf: None (the default device), a
      `jax.Device`, or a `jax.sharding.Sharding`, e.g.
      ``NamedSharding(mesh, PartitionSpec('data'))`` to split the leading
      (batch) axis over the mesh's 'data' axis for data parallelism (the
      batch size must then be divisible by that axis' size). With several
      processes each process passes its local part of the global batch.

  Yields:
    The same pytrees with `jax.Array` leaves.
  """
  size = _check_int("size", size, 1)
  if sharding is not None and not isinstance(
      sharding, (jax.sharding.Sharding, jax.Device)):
    raise TypeError("prefetch_to_device: sharding must be None, a jax.Device "
                    f"or a jax.sharding.Sharding, got {type(sharding).__name__}")
  return _prefetch(iter(iterator), size, sharding)


def _prefetch(iterator, size, sharding):
  queue = collections.deque()

  def enqueue(count):
    for item in itertools.islice(iterator, count):
      queue.append(jax.tree.map(lambda x: _device_put(x, sharding), item))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
