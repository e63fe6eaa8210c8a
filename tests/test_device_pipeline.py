"""Tests for bn_jax.data.device_pipeline (the batch of a step computed on the
device from (seed, step)).

References are independent of the code under test: Random123's published
threefry2x32-20 known answers, jax.random's keys and threefry, a plain-Python re-implementation of the
documented permutation, the host pipeline's NumPy crop/flip/normalization
(`bn_jax.data.pipeline`), NumPy float64 formulas, and chi-square statistics
of crops and flips decoded from the output images themselves.
"""
import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import stats

from bn_jax import data as bd
from bn_jax.data import device_pipeline as dp

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7

_batch = jax.jit(dp.batch_at, static_argnames=("batch_size", "augment",
                                               "pad", "normalize"))


def _dataset(n, shape, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
  labels = np.arange(n, dtype=np.int32)  # label i identifies example i
  mean, std = bd.channel_stats(images)
  return bd.ArrayDataset(images, labels, n, mean, std, "toy")


def _coordinate_dataset(n, size=8):
  """Pixel (r, c) of every image holds (r + 1, c + 1, i mod 256): the crop
  offset and flip of an output image can be read back from its pixels."""
  rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  images = np.empty((n, size, size, 3), np.uint8)
  images[..., 0] = rows + 1
  images[..., 1] = cols + 1
  images[..., 2] = (np.arange(n) % 256)[:, None, None]
  mean, std = bd.channel_stats(images)
  return bd.ArrayDataset(images, np.arange(n, dtype=np.int32), n, mean, std,
                         "coordinates")


def _decode_crops(images, pad):
  """(dy, dx, flip) of each uint8 crop of a `_coordinate_dataset` image.

  An output pixel (r, c) that is not padding holds (row + 1, col + 1) of its
  source pixel; the host definition says row = r + dy - pad and col = c' +
  dx - pad with c' = W - 1 - c when flipped.
  """
  out = []
  for image in images:
    r, c = np.argwhere(image[..., 0] > 0)[0]
    row_values = image[r, :, 1][image[r, :, 1] > 0]
    flip = bool(row_values[0] > row_values[-1])
    w = image.shape[1]
    c_source = w - 1 - c if flip else c
    out.append((int(image[r, c, 0]) - 1 - r + pad,
                int(image[r, c, 1]) - 1 - c_source + pad, flip))
  return np.array(out)


# --------------------------------------------------------------------------
# Independent re-implementation of the documented order (plain Python ints)


def _fmix32(x):
  x ^= x >> 16
  x = (x * 0x85EBCA6B) & 0xFFFFFFFF
  x ^= x >> 13
  x = (x * 0xC2B2AE35) & 0xFFFFFFFF
  return x ^ (x >> 16)


def _reference_permutation(seed, epoch, n):
  """pi_e(p) for every p, from the module docstring's definition."""
  key_order = jax.random.fold_in(jax.random.fold_in(
      jax.random.key(seed, impl="threefry2x32"), epoch), 0)
  words = np.asarray(jex_random.threefry_2x32(
      jax.random.key_data(key_order),
      np.concatenate([np.arange(6), np.zeros(6)]).astype(np.uint32)))
  round_keys = [int(w) for w in words[:6]]  # first word of block (j, 0)
  a = int(np.ceil(np.sqrt(n)))
  while (a - 1) * (a - 1) >= n:  # guard float sqrt
    a -= 1
  while a * a < n:
    a += 1
  b = -(-n // a)

  def encrypt(x):
    high, low, r, s = x // b, x % b, a, b
    for k in round_keys:
      high, low = low, (high + _fmix32(low ^ k) % r) % r
      r, s = s, r
    return high * b + low

  out = []
  for p in range(n):
    y = encrypt(p)
    while y >= n:
      y = encrypt(y)
    out.append(y)
  return np.array(out)


def test_threefry2x32_known_answers_and_jax():
  # Random123 kat_vectors, threefry2x32 with 20 rounds: (key, counter) ->
  # output. Pins the per-position random words to the published function.
  cases = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
           ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
            (0x1CB996FC, 0xBB002BE7)),
           ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3),
            (0xC4923A9C, 0x483DF7A0))]
  for key, counter, expected in cases:
    got = dp.threefry2x32(jnp.array(key, jnp.uint32),
                          jnp.array([counter[0]], jnp.uint32),
                          jnp.array([counter[1]], jnp.uint32))
    assert (int(got[0][0]), int(got[1][0])) == expected
  # And JAX's own implementation on random blocks.
  words = np.random.default_rng(0).integers(0, 2**32, 2 + 2 * 64,
                                            dtype=np.uint32)
  got = jnp.concatenate(dp.threefry2x32(jnp.asarray(words[:2]),
                                        jnp.asarray(words[2:66]),
                                        jnp.asarray(words[66:])))
  np.testing.assert_array_equal(
      got, jex_random.threefry_2x32(words[:2], words[2:]))


@pytest.mark.parametrize("seed,epoch", [(0, 0), (3, 7), (2**31 - 1, 12345)])
def test_epoch_keys_are_jax_random_fold_ins(seed, epoch):
  key_epoch = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"),
                                 epoch)
  key_order, key_aug = dp.epoch_keys(seed, epoch)
  for got, data in ((key_order, 0), (key_aug, 1)):
    np.testing.assert_array_equal(
        got, jax.random.key_data(jax.random.fold_in(key_epoch, data)))
  # Augmentation words: threefry blocks (p, 0) and (p, 1) under key_aug.
  positions = np.arange(0, 5000, 7, dtype=np.uint32)
  block0 = jex_random.threefry_2x32(
      key_aug, np.concatenate([positions, 0 * positions]))
  block1 = jex_random.threefry_2x32(
      key_aug, np.concatenate([positions, 0 * positions + 1]))
  m = len(positions)
  offsets, flips = dp.augmentation_at(key_aug, positions, pad=4)
  np.testing.assert_array_equal(offsets[:, 0], np.asarray(block0[:m]) % 9)
  np.testing.assert_array_equal(offsets[:, 1], np.asarray(block0[m:]) % 9)
  np.testing.assert_array_equal(flips, np.asarray(block1[:m]) >= 2**31)


def test_fmix32_matches_murmur3():
  values = np.array([0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF], np.uint32)
  np.testing.assert_array_equal(
      np.asarray(dp.fmix32(jnp.asarray(values))),
      [_fmix32(int(v)) for v in values])
  assert _fmix32(1) == 0x514E28B7  # MurmurHash3 fmix32(1), published value


@pytest.mark.parametrize("n", [1, 2, 3, 7, 23, 64, 1000, 4099])
def test_permutation_is_the_documented_bijection(n):
  key_order = dp.epoch_keys(5, 3)[0]
  got = np.asarray(jax.jit(dp.permutation_at, static_argnums=2)(
      key_order, jnp.arange(n), n))
  np.testing.assert_array_equal(got, _reference_permutation(5, 3, n))
  np.testing.assert_array_equal(np.sort(got), np.arange(n))


def test_order_is_uniform_over_epochs():
  # Where example 0 lands, and which example is first, over 3000 epochs of
  # n = 12: each of the 12 values about 250 times (chi-square, 11 dof). A
  # weak round function (e.g. one Feistel round) fails this badly.
  n, epochs = 12, 3000
  orders = jax.jit(jax.vmap(lambda e: dp.permutation_at(
      dp.epoch_keys(0, e)[0], jnp.arange(n), n)))(
          jnp.arange(epochs))
  orders = np.asarray(orders)
  for counts in (np.bincount(orders[:, 0], minlength=n),
                 np.bincount(np.argmax(orders == 0, axis=1), minlength=n)):
    assert stats.chisquare(counts).pvalue > 1e-4, counts
  # Consecutive positions are not correlated: pi(1) - pi(0) mod n uniform on
  # the n - 1 non-zero differences.
  diffs = (orders[:, 1] - orders[:, 0]) % n
  assert stats.chisquare(np.bincount(diffs, minlength=n)[1:]).pvalue > 1e-4


# --------------------------------------------------------------------------
# Batches


def test_every_example_once_per_epoch_and_epochs_differ():
  ds = _dataset(50, (4, 4, 1))
  data = dp.put_on_device(ds)
  labels = [np.asarray(_batch(data, t, batch_size=8, seed=1,
                              augment=False)["label"]) for t in range(12)]
  first = np.concatenate(labels[:6])  # 6 full batches per epoch (2 dropped)
  second = np.concatenate(labels[6:])
  for epoch in (first, second):
    assert len(np.unique(epoch)) == 48
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(first, _reference_permutation(1, 0, 50)[:48])
  np.testing.assert_array_equal(second, _reference_permutation(1, 1, 50)[:48])


@pytest.mark.parametrize("augment,mirrored", [(False, False), (True, False),
                                              (True, True)])
def test_batches_equal_host_operations_on_the_same_draws(augment, mirrored):
  # The host pipeline's NumPy crop_and_flip and normalization table, given the
  # device's order, offsets and flips, give exactly the device's batch: with
  # flips selected after the crop, and with flips sliced from the stored
  # mirror images.
  ds = _dataset(40, (9, 7, 3), seed=2)
  pad = 3
  # Stored border wider than the crop padding (5 > 3); none when not needed.
  data = dp.put_on_device(ds, padding=5 if augment else 0, mirrored=mirrored)
  assert data.mirrored == mirrored and data.num_examples == 40
  assert data.images.shape == ((80 if mirrored else 40),
                               9 + (10 if augment else 0),
                               7 + (10 if augment else 0), 3)
  for step in (0, 4, 9):  # 4 batches per epoch: steps in epochs 0, 1, 2
    batch = _batch(data, step, batch_size=10, seed=7, augment=augment,
                   pad=pad, normalize=False)
    epoch, k = divmod(step, 4)
    positions = np.arange(k * 10, k * 10 + 10)
    index = _reference_permutation(7, epoch, 40)[positions]
    images = ds.images[index]
    if augment:
      offsets, flips = dp.augmentation_at(
          dp.epoch_keys(7, epoch)[1], positions, pad)
      images = bd.crop_and_flip(images, np.asarray(offsets),
                                np.asarray(flips), pad)
    table = bd.normalization_table(ds.mean, ds.std, normalize=False)
    np.testing.assert_array_equal(batch["image"],
                                  bd.normalize_images(images, table))
    np.testing.assert_array_equal(batch["label"], ds.labels[index])


def test_crops_and_flips_have_the_host_distribution():
  # Offsets and flips decoded from the output pixels (not from the draws):
  # device and host both uniform on the 9 x 9 x 2 cells, and the same
  # distribution (chi-square homogeneity test of the two count tables).
  pad, n, batch_size = 4, 512, 128
  ds = _coordinate_dataset(n)
  data = dp.put_on_device(ds)
  steps = 48  # 6144 crops per pipeline, ~38 per cell
  device = np.concatenate([np.asarray(_batch(
      data, t, batch_size=batch_size, seed=3, augment=True,
      normalize=False)["image"]) for t in range(steps)])
  host = np.concatenate([b["image"] for e in range(steps * batch_size // n)
                         for b in bd.epoch_batches(
                             ds, batch_size, seed=3, epoch=e, augment=True,
                             normalize=False)])
  tables = []
  for images in (device, host):
    crops = _decode_crops(np.rint(images * 255).astype(np.uint8), pad)
    cells = (crops[:, 0] * 9 + crops[:, 1]) * 2 + crops[:, 2]
    assert crops[:, :2].min() >= 0 and crops[:, :2].max() <= 2 * pad
    counts = np.bincount(cells, minlength=162)
    assert stats.chisquare(counts).pvalue > 1e-4
    assert abs(crops[:, 2].mean() - 0.5) < 4 * 0.5 / np.sqrt(len(crops))
    tables.append(counts)
  assert stats.chi2_contingency(np.array(tables)).pvalue > 1e-4
  # The decoded crops are exactly the drawn ones (position p of epoch e).
  positions = np.arange(steps * batch_size) % n
  epochs = np.arange(steps * batch_size) // n
  drawn = [dp.augmentation_at(dp.epoch_keys(3, e)[1],
                              positions[epochs == e], pad)
           for e in range(epochs.max() + 1)]
  offsets = np.concatenate([np.asarray(o) for o, _ in drawn])
  flips = np.concatenate([np.asarray(f) for _, f in drawn])
  decoded = _decode_crops(np.rint(device * 255).astype(np.uint8), pad)
  np.testing.assert_array_equal(decoded[:, :2], offsets)
  np.testing.assert_array_equal(decoded[:, 2].astype(bool), flips)


def test_normalization_matches_numpy_float64():
  # Every byte value of every channel. The lookup table holds float64 values
  # rounded once to float32: relative error <= eps/2; tolerance 5 eps (10x).
  values = np.arange(256, dtype=np.uint8)
  images = np.broadcast_to(values[:, None, None, None], (256, 1, 1, 3)).copy()
  mean = np.array([0.49, 0.01, 0.93], np.float32)
  std = np.array([0.25, 0.03, 0.6], np.float32)
  # Label i marks the image whose pixels are all i (the batch is shuffled).
  ds = bd.ArrayDataset(images, values.astype(np.int32), 256, mean, std,
                       "bytes")
  data = dp.put_on_device(ds)
  for normalize in (True, False):
    batch = _batch(data, 0, batch_size=256, seed=0, augment=False,
                   normalize=normalize)
    byte = np.asarray(batch["label"])
    np.testing.assert_array_equal(np.sort(byte), values)
    expected = np.repeat(byte[:, None] / 255.0, 3, axis=1)
    if normalize:
      expected = (expected - mean.astype(np.float64)) / std.astype(np.float64)
    np.testing.assert_allclose(
        np.asarray(batch["image"], np.float64).reshape(256, 3), expected,
        rtol=5 * EPS32, atol=0)


def test_normalized_dataset_has_zero_mean_unit_std():
  # A whole epoch (no drop: 1797 = 3 * 599) normalized with the train-split
  # statistics: mean 0, std 1 per channel in float64 sums (error ~ eps * 3).
  ds = bd.load_dataset("digits", "train")
  n = len(ds)
  batch = next(d for d in range(512, 0, -1) if n % d == 0)
  data = dp.put_on_device(ds)
  images = np.concatenate([np.asarray(_batch(
      data, t, batch_size=batch, seed=0, augment=False)["image"],
      np.float64) for t in range(n // batch)])
  np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


# --------------------------------------------------------------------------
# Resume


def _scan_batches(data, start, count, seed):
  def body(_, step):
    b = dp.batch_at(data, step, batch_size=6, seed=seed, augment=True)
    return None, (b["image"], b["label"])
  return jax.jit(lambda d, s: jax.lax.scan(body, None, s + jnp.arange(
      count))[1])(data, start)


def test_resume_is_bit_exact():
  # An uninterrupted scan over steps 0..11 (5 batches per epoch: crosses two
  # epoch boundaries) against a fresh trace (caches cleared) started at step
  # 7, and a separately jitted call. batch_at reads no state but its
  # arguments, so a fresh process is a fresh trace.
  ds = _dataset(30, (5, 5, 2), seed=4)
  data = dp.put_on_device(ds)
  images, labels = _scan_batches(data, 0, 12, 11)
  jax.clear_caches()
  resumed_images, resumed_labels = _scan_batches(data, 7, 5, 11)
  np.testing.assert_array_equal(images[7:], resumed_images)
  np.testing.assert_array_equal(labels[7:], resumed_labels)
  eager = jax.jit(lambda d: dp.batch_at(d, 9, batch_size=6, seed=11,
                                        augment=True))(data)
  np.testing.assert_array_equal(images[9], eager["image"])
  np.testing.assert_array_equal(labels[9], eager["label"])


def test_independent_of_the_default_prng_implementation():
  ds = _dataset(20, (6, 6, 1))
  data = dp.put_on_device(ds)
  expected = jax.jit(lambda d: dp.batch_at(d, 3, batch_size=4, seed=2,
                                           augment=True))(data)
  with jax.default_prng_impl("rbg"):  # traced (and cached) under rbg
    got = jax.jit(lambda d: dp.batch_at(d, 3, batch_size=4, seed=2,
                                        augment=True))(data)
  np.testing.assert_array_equal(expected["image"], got["image"])
  np.testing.assert_array_equal(expected["label"], got["label"])


def test_replicated_dataset_gives_the_same_sharded_batch():
  devices = np.array(jax.devices())
  if devices.size < 2:
    pytest.skip("needs several (simulated) devices; conftest sets 8 on CPU")
  mesh = Mesh(devices, ("data",))
  ds = _dataset(64, (6, 6, 3))
  single = _batch(dp.put_on_device(ds), 5, batch_size=16, seed=0,
                  augment=True)
  data = dp.put_on_device(ds, NamedSharding(mesh, PartitionSpec()))
  split = NamedSharding(mesh, PartitionSpec("data"))
  sharded = jax.jit(lambda d: jax.lax.with_sharding_constraint(
      dp.batch_at(d, 5, batch_size=16, seed=0, augment=True), split))(data)
  assert sharded["image"].sharding.is_equivalent_to(split, 4)
  np.testing.assert_array_equal(single["image"], sharded["image"])
  np.testing.assert_array_equal(single["label"], sharded["label"])


def test_bad_arguments_name_the_argument():
  ds = _dataset(20, (4, 4, 1))
  data = dp.put_on_device(ds)
  call = lambda **kw: dp.batch_at(**{**dict(
      data=data, step=0, batch_size=4, seed=0, augment=False), **kw})
  with pytest.raises(TypeError, match="data must be a DeviceDataset"):
    call(data=ds)
  with pytest.raises(ValueError, match="batch_size=21 exceeds"):
    call(batch_size=21)
  with pytest.raises(TypeError, match="batch_size must be an int"):
    call(batch_size=4.0)
  with pytest.raises(ValueError, match="pad=4 must be smaller"):
    call(pad=4, augment=True)
  with pytest.raises(TypeError, match="augment must be a bool"):
    call(augment=1)
  with pytest.raises(ValueError, match="step must be >= 0"):
    call(step=-1)
  with pytest.raises(TypeError, match="seed must be an int"):
    call(seed=1.5)
  with pytest.raises(TypeError, match="step must be an int"):
    call(step=jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="pad=2 exceeds the zero border of 1"):
    call(data=dp.put_on_device(_dataset(20, (6, 6, 1)), padding=1), pad=2,
         augment=True)
  with pytest.raises(ValueError, match="padding must be >= 0"):
    dp.put_on_device(ds, padding=-1)
  with pytest.raises(TypeError, match="ds must be an ArrayDataset"):
    dp.put_on_device(data)
  with pytest.raises(TypeError, match="sharding must be None"):
    dp.put_on_device(ds, sharding="cpu")
