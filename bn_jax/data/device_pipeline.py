"""On-device input pipeline: the dataset lives on the device as uint8, and the
batch of a training step is a pure, jittable function of ``(seed, step)``.

`put_on_device` copies an `ArrayDataset` to the device once (uint8 images
with a zero border for the crops, int32 labels, float32 normalization
tables); `batch_at` computes the batch of step t inside jit (also inside
``lax.scan`` over steps): gather, random crop with zero padding, horizontal
flip and normalization, with nothing done on the host per step. The NumPy host path (`bn_jax.data.pipeline`) stays for
datasets that do not fit on the device.

Schedule (the same as `bn_jax.training.input_pipeline.train_iterator`): with
``S = N // B`` full batches per epoch (remainder dropped), step t is batch
``k = t mod S`` of epoch ``e = t // S`` and holds the examples at epoch
positions ``p = k B, ..., k B + B - 1``.

Random numbers: counter-mode threefry2x32-20 (Random123; the function behind
``jax.random``'s default keys), here unrolled in jnp (`threefry2x32`): JAX
lowers its own threefry to a rolled loop on CPU, a handful of tiny kernels per
round, which cost more than the whole crop. Keys are pairs of uint32 words:

  key(seed) = (0, seed)                        (= jax.random.key(seed))
  key_e     = threefry2x32(key(seed), (0, e))  (= fold_in(key(seed), e))
  key_order = threefry2x32(key_e, (0, 0)),   key_aug = threefry2x32(key_e, (0, 1))

(the equalities with ``jax.random`` hold bit for bit for threefry keys, and
are tested; the default PRNG implementation does not matter).

* Order: position p of epoch e holds example ``pi_e(p)`` where ``pi_e`` is a
  keyed pseudo-random permutation of [0, N), computed per position (O(B) work
  per step, no O(N log N) shuffle per step: ``jax.random.permutation`` of
  50,000 indices takes ~70 ms on a CPU, 100x a step's input budget).
  ``pi_e`` is a Feistel network over mixed radices: with a = ceil(sqrt N),
  b = ceil(N / a), x in [0, a b) is the pair (x // b, x % b), and round j
  (j = 0 .. `FEISTEL_ROUNDS` - 1) maps (H, L) in Z_r x Z_s to
  (L, (H + F_j(L) mod r) mod r) in Z_s x Z_r (the radices swap; an even
  number of rounds restores (a, b)), with the keyed round function
      F_j(L) = fmix32(L xor k_j),   k_j = threefry2x32(key_order, (j, 0))[0]
  (fmix32: MurmurHash3's finalizer). Every round is a bijection whatever F,
  so the network permutes [0, a b); with 6 rounds of well-mixed keyed round
  functions the order is pseudo-random (a shuffle, not cryptography). It is
  restricted to [0, N) by cycle walking: y = E(p); while y >= N: y = E(y)
  (a bijection of [0, N); since a b - N < a, a position walks with
  probability < 1 / sqrt(N)).
* Augmentation of position p (independent of the batch size, like the host
  pipeline's per-position draws), from the threefry blocks (p, 0) and (p, 1)
  under key_aug (see `augmentation_at`): crop corner (dy, dx) uniform on
  {0, ..., 2 pad}^2 and a fair flip; then the host pipeline's `crop_and_flip`
  map: zero-pad `pad` pixels on each side, take the HxW crop whose corner is
  (dy, dx) in the padded image, mirror left-right when `flip`.

Difference from the host pipeline: the host draws order, offsets and flips
from NumPy's ``default_rng([seed, epoch])``; the device pipeline from the
threefry keys above. Both give every example once per epoch, crop offsets
uniform on {0, ..., 2 pad}^2 and fair flips (the same distribution; tests
count them), but not the same draws, so a run on one pipeline is a different
(equally valid) sample than on the other. Given the same order, offsets and
flips, the two produce identical batches, bit for bit (tested).

Normalization (in jit): a lookup in the host pipeline's float32 table
(`bn_jax.data.pipeline.normalization_table`: ``(v / 255 - mean_c) / std_c``
for each byte value v, evaluated in float64 and rounded once), so device and
host batches agree bit for bit given the same order, offsets and flips. (On
XLA:CPU the lookup costs about what ``x * scale + bias`` costs, and
``x / 255`` is not even correctly rounded there: XLA multiplies by the
reciprocal.)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Optional, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from bn_jax.data.datasets import ArrayDataset
from bn_jax.data.pipeline import _check_int  # static (Python) ints
from bn_jax.data.pipeline import CROP_PADDING
from bn_jax.data.pipeline import normalization_table

FEISTEL_ROUNDS = 6

Batch = dict[str, jax.Array]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["images", "labels", "table", "raw_table"],
                   meta_fields=["padding", "mirrored"])
@dataclasses.dataclass(frozen=True)
class DeviceDataset:
  """A dataset split held on the device (a pytree; pass it to jit).

  Attributes:
    images: uint8 [N, H + 2 padding, W + 2 padding, C]: the images with a
      border of `padding` zero pixels, stored so that a padded random crop is
      a plain slice per example (``lax.dynamic_slice``; on XLA:CPU about as
      fast as no crop, 2x faster than gathering rows and columns of unpadded
      images). Memory: (H + 2p)(W + 2p) / (HW) of the raw images (1.56x for
      CIFAR at p = 4). When `mirrored`, rows N .. 2N - 1 hold the same
      padded images mirrored left-right, so a flipped crop is one slice too
      (twice the memory; on XLA:CPU ~1.8x faster batches than selecting
      between a crop and its mirror, benchmarks/RESULTS.md).
    labels: int32 [N].
    table: float32 [256, C], ``(v / 255 - mean_c) / std_c`` with the
      train-split statistics (`normalization_table`).
    raw_table: float32 [256, C], ``v / 255`` (``normalize=False``).
    padding: static int, the zero border stored around each image (the
      largest crop padding `batch_at` accepts).
    mirrored: static bool, whether `images` is followed by its mirror
      images (see `images`).

  Metadata (name, num_classes) stays on the host `ArrayDataset`.
  """
  images: jax.Array
  labels: jax.Array
  table: jax.Array
  raw_table: jax.Array
  padding: int
  mirrored: bool = False

  @property
  def num_examples(self) -> int:
    return self.images.shape[0] // (2 if self.mirrored else 1)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images without the stored border."""
    _, h, w, c = self.images.shape
    return h - 2 * self.padding, w - 2 * self.padding, c


def put_on_device(ds: ArrayDataset,
                  sharding: Optional[Union[jax.sharding.Sharding,
                                           jax.Device]] = None,
                  *, padding: int = CROP_PADDING,
                  mirrored: Optional[bool] = None) -> DeviceDataset:
  """Copies `ds` to the device(s) as a `DeviceDataset` (images stay uint8).

  Args:
    ds: the host dataset.
    sharding: None (default device), a `jax.Device`, or a
      `jax.sharding.Sharding` for every array, typically replicated
      (``NamedSharding(mesh, PartitionSpec())``) so that each device gathers
      its part of the batch locally; the caller then constrains the batch to
      the data-parallel sharding (``jax.lax.with_sharding_constraint``).
    padding: zero border stored around each image, >= the crop padding
      `batch_at` will use (0 when the data is never augmented: no extra
      memory).
    mirrored: also store the mirror images, for fast flips (default: when
      `padding` > 0, i.e. for augmentation).
  """
  if not isinstance(ds, ArrayDataset):
    raise TypeError("put_on_device: ds must be an ArrayDataset, got "
                    f"{type(ds).__name__}")
  padding = _check_int("padding", padding, 0)
  if sharding is not None and not isinstance(
      sharding, (jax.sharding.Sharding, jax.Device)):
    raise TypeError("put_on_device: sharding must be None, a jax.Device or a "
                    f"jax.sharding.Sharding, got {type(sharding).__name__}")
  if mirrored is None:
    mirrored = padding > 0
  if not isinstance(mirrored, (bool, np.bool_)):
    raise TypeError(f"put_on_device: mirrored must be a bool or None, got "
                    f"{mirrored!r}")
  images = np.pad(ds.images, ((0, 0), (padding, padding), (padding, padding),
                              (0, 0)))
  if mirrored:
    images = np.concatenate([images, images[:, :, ::-1]])
  arrays = DeviceDataset(
      images, ds.labels, normalization_table(ds.mean, ds.std),
      normalization_table(ds.mean, ds.std, normalize=False), padding,
      bool(mirrored))
  return jax.device_put(arrays, sharding)


def _check_scalar_int(name: str, value: Any) -> Any:
  """An int or an integer scalar array (may be traced)."""
  if isinstance(value, bool):
    raise TypeError(f"{name} must be an int, got a bool")
  if isinstance(value, numbers.Integral):
    if value < 0:
      raise ValueError(f"{name} must be >= 0, got {value}")
    return value
  dtype = getattr(value, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or (
      jnp.ndim(value) != 0):
    raise TypeError(f"{name} must be an int or an integer scalar array, got "
                    f"{type(value).__name__} {getattr(value, 'shape', '')} "
                    f"{dtype}")
  return value


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds (Random123), elementwise and unrolled.

  Args:
    key: uint32 [2], the key words (k0, k1).
    x0, x1: uint32 arrays of one shape, the counter blocks' two words.

  Returns:
    The two output words of each block (``jax.extend.random.threefry_2x32``
    and Random123 agree; tested against Random123's known answers).
  """
  k0, k1 = key[0], key[1]
  schedule = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
  x0, x1 = x0 + k0, x1 + k1
  for block in range(5):
    for rotation in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = (x1 << rotation) | (x1 >> (32 - rotation))
      x1 = x1 ^ x0
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + jnp.uint32(block + 1)
  return x0, x1


def epoch_keys(seed, epoch) -> tuple[jax.Array, jax.Array]:
  """(key_order, key_aug) of `epoch`, uint32 [2] each (module docstring)."""
  zero = jnp.zeros((), jnp.uint32)
  key_seed = jnp.stack([zero, jnp.asarray(seed).astype(jnp.uint32)])
  key_epoch = jnp.stack(threefry2x32(
      key_seed, zero, jnp.asarray(epoch).astype(jnp.uint32)))
  first, second = threefry2x32(key_epoch, jnp.zeros(2, jnp.uint32),
                               jnp.arange(2, dtype=jnp.uint32))
  return (jnp.stack([first[0], second[0]]),
          jnp.stack([first[1], second[1]]))


def fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full
  avalanche (every input bit flips each output bit with probability ~1/2)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def feistel_radices(n: int) -> tuple[int, int]:
  """(a, b) = (ceil(sqrt(n)), ceil(n / a)): a * b >= n, a * b - n < a."""
  a = math.isqrt(n - 1) + 1 if n > 1 else 1
  return a, -(-n // a)


def permutation_at(key_order: jax.Array, positions: jax.Array,
                   n: int) -> jax.Array:
  """``pi(positions)`` for the keyed permutation pi of [0, n) (module doc).

  Args:
    key_order: uint32 [2] (`epoch_keys`).
    positions: int array, values in [0, n).
    n: static domain size, 1 <= n < 2**31.

  Returns:
    int32 array like `positions`: distinct positions give distinct indices.
  """
  n = _check_int("n", n, 1)
  if n >= 2 ** 31:
    raise ValueError(f"permutation_at: n must be < 2**31, got {n}")
  a, b = feistel_radices(n)
  counters = jnp.arange(FEISTEL_ROUNDS, dtype=jnp.uint32)
  round_keys, _ = threefry2x32(key_order, counters, jnp.zeros_like(counters))

  def encrypt(x):
    high, low = x // b, x % b  # x = high * b + low, high < a, low < b
    radix_high, radix_low = a, b
    for j in range(FEISTEL_ROUNDS):  # even: ends with radices (a, b) again
      mixed = fmix32(low ^ round_keys[j]) % radix_high
      high, low = low, (high + mixed) % radix_high
      radix_high, radix_low = radix_low, radix_high
    return high * b + low

  x = encrypt(jnp.asarray(positions).astype(jnp.uint32))
  # Cycle walking: re-encrypt the values that fell in [n, a b) (probability
  # (a b - n) / (a b) < 1 / sqrt(n) per position: the loop rarely runs).
  x = lax.while_loop(lambda y: jnp.any(y >= n),
                     lambda y: jnp.where(y >= n, encrypt(y), y), x)
  return x.astype(jnp.int32)


def augmentation_at(key_aug: jax.Array, positions: jax.Array,
                    pad: int = CROP_PADDING) -> tuple[jax.Array, jax.Array]:
  """Crop offsets int32 [..., 2] in [0, 2 pad] and flips bool [...].

  For position p: ``(w0, w1) = threefry(key_aug, (p, 0))``, ``(w2, _) =
  threefry(key_aug, (p, 1))``; ``dy = w0 mod (2 pad + 1)``, ``dx = w1 mod
  (2 pad + 1)``, ``flip = w2 >= 2**31``. (The modulo's bias is below 2**-32
  per value: uniform for any count one can make.)
  """
  pad = _check_int("pad", pad, 0)
  shape = jnp.shape(positions)
  p = jnp.asarray(positions).astype(jnp.uint32).reshape(-1)
  w0, w1 = threefry2x32(key_aug, p, jnp.zeros_like(p))
  w2, _ = threefry2x32(key_aug, p, jnp.ones_like(p))
  span = jnp.uint32(2 * pad + 1)
  offsets = jnp.stack([w0 % span, w1 % span], axis=-1).astype(jnp.int32)
  flips = w2 >= jnp.uint32(2 ** 31)
  return offsets.reshape(shape + (2,)), flips.reshape(shape)


def crop_and_flip_stored(images: jax.Array, padding: int, index: jax.Array,
                         offsets: jax.Array, flips: jax.Array,
                         pad: int, *, mirrored: bool = False) -> jax.Array:
  """The host's ``crop_and_flip(raw[index], offsets, flips, pad)`` from images
  stored with a zero border of ``padding >= pad`` pixels.

  The crop with corner (dy, dx) of the image padded by `pad` is the slice at
  (dy + padding - pad, dx + padding - pad) of the stored image; then mirrored
  left-right where `flips`. With `mirrored` storage (`images` = the N padded
  images, then their N mirror images) a flipped crop is the slice of example
  ``i + N`` at column ``Wp - W - x`` (the mirror of columns x .. x + W - 1),
  so every crop is one slice and nothing is selected afterwards.
  """
  rows, hp, wp, c = images.shape
  h, w = hp - 2 * padding, wp - 2 * padding
  starts = offsets + (padding - pad)
  # Sliced as [rows, Hp, Wp * C] (a free reshape): a crop's row is then one
  # contiguous run of W * C values in the minor dimension instead of W runs
  # of C, which XLA:CPU copies faster (~6% more batches/s, measured
  # interleaved; the same values).
  merged = images.reshape(rows, hp, wp * c)

  def crop(i, y, x):
    return lax.dynamic_slice(merged, (i, y, x * c), (1, h, w * c))[0]

  if mirrored:
    x = jnp.where(flips, wp - w - starts[:, 1], starts[:, 1])
    source = jnp.where(flips, index + rows // 2, index)
    return jax.vmap(crop)(source, starts[:, 0], x).reshape(-1, h, w, c)
  crops = jax.vmap(crop)(index, starts[:, 0], starts[:, 1]).reshape(
      -1, h, w, c)
  return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


def _materialize(tree, never: jax.Array):
  """`tree`, computed into buffers before its consumers run.

  XLA fuses cheap elementwise producers into each consumer element: left
  alone, it recomputes the 20 threefry rounds of an example's offsets and
  flip for every one of its H W C pixels (10x slower on CPU).
  ``lax.optimization_barrier`` does not stop this (XLA:CPU drops barriers
  before fusion); the outputs of a while loop are always buffers, so `tree`
  goes through one whose trip count (`never`: a traced False that XLA cannot
  prove False) is zero.
  """
  def body(carry):  # never runs; it changes the values only so that XLA
    # cannot treat them as loop invariants and hoist them out of the loop.
    changed = jax.tree.map(
        lambda x: ~x if x.dtype == jnp.bool_ else x + 1, carry[1])
    return jnp.zeros_like(carry[0]), changed
  return lax.while_loop(lambda carry: carry[0], body, (never, tree))[1]


def batch_at(data: DeviceDataset, step, *, batch_size: int, seed,
             augment: bool, pad: int = CROP_PADDING,
             normalize: bool = True) -> Batch:
  """The training batch of `step`: a pure function of ``(seed, step)``.

  Jittable and usable inside ``lax.scan`` (`step` and `seed` may be traced);
  batch t is the same whichever process, trace or starting step computes it,
  so a resumed run sees exactly the batches of an uninterrupted one.

  Args:
    data: the `DeviceDataset` (from `put_on_device`).
    step: int or integer scalar array, >= 0 (global step; the epoch is
      ``step // (N // batch_size)``).
    batch_size: static int, 1 <= batch_size <= N.
    seed: int or integer scalar array, >= 0.
    augment: static bool: random crop with `pad` pixels of zero padding and
      random horizontal flip (module docstring).
    pad: static int >= 0 (when augmenting: < H, < W and <= data.padding).
    normalize: static bool: ``(x / 255 - mean) / std`` (else ``x / 255``),
      by table lookup (module docstring).

  Returns:
    ``{'image': float32 [B, H, W, C], 'label': int32 [B]}``.
  """
  if not isinstance(data, DeviceDataset):
    raise TypeError("batch_at: data must be a DeviceDataset (put_on_device), "
                    f"got {type(data).__name__}")
  n = data.num_examples
  h, w, _ = data.image_shape
  batch_size = _check_int("batch_size", batch_size, 1)
  if batch_size > n:
    raise ValueError(f"batch_at: batch_size={batch_size} exceeds the {n} "
                     "examples: an epoch would have no full batch")
  for name, flag in (("augment", augment), ("normalize", normalize)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"batch_at: {name} must be a bool (static), got "
                      f"{flag!r}")
  pad = _check_int("pad", pad, 0)
  if augment and (pad >= h or pad >= w):
    raise ValueError(f"batch_at: pad={pad} must be smaller than the image "
                     f"size {h}x{w}")
  if augment and pad > data.padding:
    raise ValueError(
        f"batch_at: pad={pad} exceeds the zero border of {data.padding} "
        "pixels the dataset was stored with (put_on_device(ds, "
        f"padding={pad}))")
  step = _check_scalar_int("step", step)
  seed = _check_scalar_int("seed", seed)

  per_epoch = n // batch_size
  step = jnp.asarray(step, jnp.int32)
  epoch, batch_in_epoch = step // per_epoch, step % per_epoch
  positions = batch_in_epoch * batch_size + jnp.arange(batch_size,
                                                       dtype=jnp.int32)
  key_order, key_aug = epoch_keys(seed, epoch)
  index = permutation_at(key_order, positions, n)
  if augment:
    offsets, flips = _materialize(augmentation_at(key_aug, positions, pad),
                                  never=index[0] < 0)
    images = crop_and_flip_stored(data.images, data.padding, index, offsets,
                                  flips, pad, mirrored=data.mirrored)
  else:
    p = data.padding
    images = data.images[index, p:p + h, p:p + w]
  table = data.table if normalize else data.raw_table
  # One 1-D gather from the flattened [256 * C] table at ``v * C + c``: the
  # same values as ``table[images, arange(C)]``. On XLA:CPU a 2-D gather is
  # ~2.5x slower than 1-D ones, and one gather over the whole batch ~1.3x
  # faster than a gather per channel stacked (benchmarks/RESULTS.md). The
  # indices are in range by construction (uint8 values), so no clamping.
  channels = table.shape[1]
  flat_index = (images.astype(jnp.int32) * channels
                + jnp.arange(channels, dtype=jnp.int32))
  images = table.reshape(-1).at[flat_index].get(mode="promise_in_bounds")
  return {"image": images, "label": data.labels[index]}
