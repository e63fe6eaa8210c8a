"""Tests for bn_jax.data: datasets (local standard files, scikit-learn digits,
tfds) and the input pipeline (shuffle, batch, augment, normalize, prefetch).

Reference values come from outside the code under test: bytes parsed by hand
with gzip/struct, the published CIFAR-10/MNIST statistics, scikit-learn's
arrays, tfds' own output, and NumPy float64 formulas.
"""
import gzip
import pathlib
import struct

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bn_jax import data as bd
from bn_jax.data import datasets as datasets_module

# --------------------------------------------------------------------------
# Helpers

# Tolerances. Dataset statistics and normalization tables are float64 values
# rounded once to float32 (no float32 arithmetic): relative error <= eps/2 =
# 6.0e-8 on any CPU; STATS_RTOL = 5 eps = 10x that.
EPS32 = float(np.finfo(np.float32).eps)
STATS_RTOL = 5 * EPS32
# Published statistics are printed with 4 decimals: off by <= 5e-5.
PUBLISHED_ATOL = 1e-4


def _toy_dataset(n=23, shape=(6, 5, 3), seed=0, num_classes=None):
  """Random images; label i identifies example i (checks order/coverage)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
  labels = np.arange(n, dtype=np.int32)
  mean, std = bd.channel_stats(images)
  return bd.ArrayDataset(images, labels, num_classes or n, mean, std, "toy")


def _write_idx(path, array, magic=None):
  array = np.asarray(array, np.uint8)
  if magic is None:
    magic = 0x0800 + array.ndim
  payload = struct.pack(">I", magic) + struct.pack(
      f">{array.ndim}I", *array.shape) + array.tobytes()
  if str(path).endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    pathlib.Path(path).write_bytes(payload)


def _write_mnist_like(directory, n_train=7, n_test=3, rows=4, cols=5,
                      seed=0, gz=True):
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {}
  suffix = ".gz" if gz else ""
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    _write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    _write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    arrays[prefix] = (images, labels)
  return arrays


def _read_idx_by_hand(path):
  """(header tuple, payload bytes) of a gzipped IDX file, via struct."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  magic, count = struct.unpack(">II", raw[:8])
  if magic == 2051:
    rows, cols = struct.unpack(">II", raw[8:16])
    return (magic, count, rows, cols), raw[16:]
  return (magic, count), raw[8:]


def _rows_as_set(images, labels):
  """Sorted (label, image bytes) records: compares datasets up to order."""
  records = np.concatenate(
      [labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)],
      axis=1)
  return np.sort(np.ascontiguousarray(records).view(
      np.dtype((np.void, records.shape[1]))).ravel())


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
  # Tests pass data_dir explicitly; a user's BN_JAX_DATA_DIR must not leak in.
  monkeypatch.delenv(bd.DATA_DIR_ENV, raising=False)


# --------------------------------------------------------------------------
# Local standard files in ../shared/data


@pytest.fixture(scope="module")
def cifar10(shared_data_dir):
  # Parsing the 6 files (~180 MB) once per module keeps the tests cheap.
  return {split: bd.load_dataset("cifar10", split, data_dir=shared_data_dir,
                                 source="local") for split in ("train", "test")}


@pytest.mark.parametrize("name,folder,known_mean,known_std", [
    ("mnist", "mnist", 0.1307, 0.3081),
    ("fashion_mnist", "fashion-mnist", 0.2860, 0.3530),
])
def test_idx_datasets_match_bytes_parsed_by_hand(shared_data_dir, name, folder,
                                                 known_mean, known_std):
  for split, prefix, count in (("train", "train", 60000),
                               ("test", "t10k", 10000)):
    ds = bd.load_dataset(name, split, data_dir=shared_data_dir, source="local")
    assert ds.images.shape == (count, 28, 28, 1)
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
    assert ds.labels.shape == (count,) and ds.num_classes == 10
    assert set(np.unique(ds.labels)) == set(range(10))
    assert (ds.name, ds.split, len(ds)) == (name, split, count)

    header, pixels = _read_idx_by_hand(
        shared_data_dir / folder / f"{prefix}-images-idx3-ubyte.gz")
    assert header == (2051, count, 28, 28)
    label_header, label_bytes = _read_idx_by_hand(
        shared_data_dir / folder / f"{prefix}-labels-idx1-ubyte.gz")
    assert label_header == (2049, count)
    for i in (0, 1, count // 2 + 7, count - 1):
      assert ds.images[i].tobytes() == pixels[i * 784:(i + 1) * 784]
      assert ds.labels[i] == label_bytes[i]
    # Statistics belong to the train split, whichever split was loaded.
    np.testing.assert_allclose(ds.mean, [known_mean], atol=PUBLISHED_ATOL)
    np.testing.assert_allclose(ds.std, [known_std], atol=PUBLISHED_ATOL)
    assert ds.mean.dtype == ds.std.dtype == np.float32


def test_cifar10_local_files(cifar10, shared_data_dir):
  train, test = cifar10["train"], cifar10["test"]
  assert train.images.shape == (50000, 32, 32, 3)
  assert test.images.shape == (10000, 32, 32, 3)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  # CIFAR-10 is balanced: 5000 train / 1000 test images per class.
  np.testing.assert_array_equal(np.bincount(train.labels), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  # Records parsed by hand: 1 label byte, then the R, G, B planes (32x32 each).
  folder = shared_data_dir / "cifar-10-batches-bin"
  for ds, file_name, record, index in ((train, "data_batch_1.bin", 0, 0),
                                       (train, "data_batch_3.bin", 9999, 29999),
                                       (train, "data_batch_5.bin", 4321, 44321),
                                       (test, "test_batch.bin", 0, 0)):
    with open(folder / file_name, "rb") as f:
      f.seek(record * 3073)
      raw = f.read(3073)
    assert ds.labels[index] == raw[0]
    for channel in range(3):
      plane = raw[1 + channel * 1024:1 + (channel + 1) * 1024]
      assert ds.images[index, :, :, channel].tobytes() == plane
  # Published training-set statistics.
  for ds in (train, test):
    np.testing.assert_allclose(ds.mean, [0.4914, 0.4822, 0.4465],
                               atol=PUBLISHED_ATOL)
    np.testing.assert_allclose(ds.std, [0.2470, 0.2435, 0.2616],
                               atol=PUBLISHED_ATOL)


def test_default_data_dir_is_env_then_shared(shared_data_dir, monkeypatch,
                                             tmp_path):
  assert bd.default_data_dir().resolve() == shared_data_dir.resolve()
  monkeypatch.setenv(bd.DATA_DIR_ENV, str(tmp_path))
  assert bd.default_data_dir() == tmp_path
  with pytest.raises(bd.DatasetNotFoundError):
    bd.load_dataset("mnist", "test", source="local")


# --------------------------------------------------------------------------
# scikit-learn digits


def test_digits_split_is_deterministic_stratified_and_rescaled():
  from sklearn.datasets import load_digits
  bunch = load_digits()
  train = bd.load_dataset("digits", "train")
  test = bd.load_dataset("digits", "test")
  assert train.images.shape[1:] == test.images.shape[1:] == (8, 8, 1)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  assert len(train) + len(test) == len(bunch.target) == 1797
  assert train.images.max() == 255 and train.images.min() == 0
  # Stratified: each class contributes floor(count / 5) test examples.
  counts = np.bincount(bunch.target)
  np.testing.assert_array_equal(np.bincount(test.labels), counts // 5)
  # Train and test partition sklearn's examples, rescaled 0..16 -> 0..255.
  expected = _rows_as_set(
      np.rint(bunch.images * 255 / 16).astype(np.uint8), bunch.target)
  got = _rows_as_set(np.concatenate([train.images, test.images]),
                     np.concatenate([train.labels, test.labels]))
  np.testing.assert_array_equal(got, expected)
  again = bd.load_dataset("digits", "test")
  np.testing.assert_array_equal(again.images, test.images)
  np.testing.assert_array_equal(test.mean, train.mean)
  np.testing.assert_allclose(train.mean, [np.mean(train.images / 255.0)],
                             rtol=STATS_RTOL)
  np.testing.assert_allclose(train.std, [np.std(train.images / 255.0)],
                             rtol=STATS_RTOL)


def test_channel_stats_matches_numpy_float64():
  images = np.random.default_rng(3).integers(0, 256, (9, 5, 4, 3),
                                             dtype=np.uint8)
  mean, std = bd.channel_stats(images)
  x = images.astype(np.float64) / 255
  np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=STATS_RTOL)
  np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=STATS_RTOL)
  with pytest.raises(TypeError, match="uint8"):
    bd.channel_stats(images.astype(np.float32))


# --------------------------------------------------------------------------
# Standard file parsing on small files written here (layouts and corruption)


def test_local_layouts_flat_and_subfolder(tmp_path):
  flat = _write_mnist_like(tmp_path / "flat", seed=1)
  ds = bd.load_dataset("mnist", "train", data_dir=tmp_path / "flat",
                       source="local")
  np.testing.assert_array_equal(ds.images[..., 0], flat["train"][0])
  np.testing.assert_array_equal(ds.labels, flat["train"][1])
  np.testing.assert_allclose(
      ds.mean, [np.mean(flat["train"][0] / 255.0)], rtol=STATS_RTOL)

  nested = _write_mnist_like(tmp_path / "nested" / "fashion-mnist", seed=2,
                             gz=False)
  ds = bd.load_dataset("fashion_mnist", "test", data_dir=tmp_path / "nested")
  np.testing.assert_array_equal(ds.images[..., 0], nested["t10k"][0])
  np.testing.assert_array_equal(ds.labels, nested["t10k"][1])
  # Train-split statistics even when only the test split was asked for.
  np.testing.assert_allclose(
      ds.std, [np.std(nested["train"][0] / 255.0)], rtol=STATS_RTOL)


@pytest.mark.parametrize("damage,match", [
    ("label_magic", "magic number 2051, expected 2049"),
    ("truncated", "truncated"),
    ("trailing", "trailing"),
    ("count_mismatch", "labels"),
    ("not_gzip", "corrupt"),
    ("not_idx", "not an IDX file"),
])
def test_corrupt_idx_files_raise(tmp_path, damage, match):
  _write_mnist_like(tmp_path)
  images_path = tmp_path / "train-images-idx3-ubyte.gz"
  labels_path = tmp_path / "train-labels-idx1-ubyte.gz"
  with gzip.open(images_path, "rb") as f:
    image_bytes = f.read()
  if damage == "label_magic":
    _write_idx(labels_path, np.zeros(7), magic=2051)
  elif damage == "truncated":
    with gzip.open(images_path, "wb") as f:
      f.write(image_bytes[:-3])
  elif damage == "trailing":
    with gzip.open(images_path, "wb") as f:
      f.write(image_bytes + b"\0")
  elif damage == "count_mismatch":
    _write_idx(labels_path, np.zeros(6))
  elif damage == "not_gzip":
    images_path.write_bytes(b"this is not gzip data")
  elif damage == "not_idx":
    with gzip.open(images_path, "wb") as f:
      f.write(b"\x1f\x8bXXXXXXXXXXXX")
  with pytest.raises(ValueError, match=match):
    bd.load_dataset("mnist", "train", data_dir=tmp_path, source="local")


def test_cifar_binary_parsing_and_corruption(tmp_path):
  rng = np.random.default_rng(4)
  folder = tmp_path / "cifar-100-binary"
  folder.mkdir()
  expected = {}
  for split, n in (("train", 5), ("test", 2)):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    coarse = rng.integers(0, 20, n, dtype=np.uint8)
    fine = rng.integers(0, 100, n, dtype=np.uint8)
    records = [bytes([c, f]) + img.transpose(2, 0, 1).tobytes()
               for c, f, img in zip(coarse, fine, images)]
    (folder / f"{split}.bin").write_bytes(b"".join(records))
    expected[split] = (images, fine)
  ds = bd.load_dataset("cifar100", "test", data_dir=tmp_path, source="local")
  np.testing.assert_array_equal(ds.images, expected["test"][0])
  np.testing.assert_array_equal(ds.labels, expected["test"][1])  # fine label
  assert ds.num_classes == 100

  bad = tmp_path / "bad.bin"
  bad.write_bytes(b"\0" * 3072)
  with pytest.raises(ValueError, match="multiple of the 3073-byte"):
    bd.read_cifar_bin(bad)
  bad.write_bytes(b"\x0a" + b"\0" * 3072)  # label 10 in CIFAR-10
  with pytest.raises(ValueError, match="out of range"):
    bd.read_cifar_bin(bad)


def test_partial_local_files_raise(tmp_path):
  _write_mnist_like(tmp_path / "mnist")
  (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(bd.DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
    bd.load_dataset("mnist", "train", data_dir=tmp_path, source="local")


def _assert_names_both_ways(message):
  assert "--config.data_dir" in message
  assert "train-images-idx3-ubyte.gz" in message
  assert "tensorflow-datasets" in message and "tfds" in message


def test_missing_dataset_message_names_both_ways(tmp_path, monkeypatch):
  with pytest.raises(bd.DatasetNotFoundError) as info:
    bd.load_dataset("fashion_mnist", "train", data_dir=tmp_path,
                    source="local")
  _assert_names_both_ways(str(info.value))
  assert str(tmp_path) in str(info.value)
  assert isinstance(info.value, FileNotFoundError)

  # 'auto' without local files falls back to tfds; when that fails too
  # (simulated here, so that the test is the same online and offline) the
  # message still names both ways and the tfds reason.
  def offline(spec, data_dir):
    raise bd.DatasetNotFoundError("simulated: no network")
  monkeypatch.setattr(datasets_module, "_tfds_builder", offline)
  with pytest.raises(bd.DatasetNotFoundError) as info:
    bd.load_dataset("fashion_mnist", "train", data_dir=tmp_path)
  _assert_names_both_ways(str(info.value))
  assert "simulated: no network" in str(info.value)


def test_unreachable_download_host_fails_fast(monkeypatch):
  for variable in datasets_module._PROXY_VARIABLES:
    monkeypatch.delenv(variable, raising=False)

  class FakeBuilder:
    name = "fake"
    url_infos = {"http://no-such-host.invalid/data.gz": None}  # RFC 2606

  with pytest.raises(bd.DatasetNotFoundError, match="no-such-host.invalid"):
    datasets_module._check_download_reachable(FakeBuilder(), timeout=2.0)


def test_bad_load_arguments():
  with pytest.raises(ValueError, match="name must be one of"):
    bd.load_dataset("imagenet", "train")
  with pytest.raises(ValueError, match="split must be one of"):
    bd.load_dataset("digits", "validation")
  with pytest.raises(ValueError, match="source must be one of"):
    bd.load_dataset("digits", "train", source="web")
  with pytest.raises(ValueError, match="scikit-learn"):
    bd.load_dataset("digits", "train", source="tfds")
  with pytest.raises(TypeError, match="data_dir"):
    bd.load_dataset("mnist", "train", data_dir=3)


def test_array_dataset_validates_fields():
  good = _toy_dataset(n=4)
  with pytest.raises(TypeError, match="images must be a uint8"):
    bd.ArrayDataset(good.images.astype(np.float32), good.labels, 4, good.mean,
                    good.std, "x")
  with pytest.raises(TypeError, match="labels must be an int32"):
    bd.ArrayDataset(good.images, good.labels.astype(np.int64), 4, good.mean,
                    good.std, "x")
  with pytest.raises(ValueError, match="labels must lie in"):
    bd.ArrayDataset(good.images, good.labels, 3, good.mean, good.std, "x")
  with pytest.raises(TypeError, match="mean must be a float32"):
    bd.ArrayDataset(good.images, good.labels, 4, good.mean[:1], good.std,
                    "x")


# --------------------------------------------------------------------------
# tensorflow-datasets


@pytest.fixture
def tfds_module():
  pytest.importorskip("tensorflow", reason="tfds' as_dataset and "
                      "tfds.testing.mock_data need TensorFlow "
                      "(pip install tensorflow-cpu)")
  import tensorflow_datasets as tfds
  yield tfds
  bd.clear_stats_cache()  # statistics of mock data must not leak


def _stack(examples):
  examples = list(examples)
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def test_tfds_source_with_mock_data(tfds_module, monkeypatch, tmp_path):
  tfds = tfds_module
  # Mocked builders never count as prepared; there is nothing to download.
  monkeypatch.setattr(datasets_module, "_check_download_reachable",
                      lambda builder: None)
  with tfds.testing.mock_data(num_examples=12):
    ds = bd.load_dataset("cifar10", "test", source="tfds")
    # (batch_size=-1 would abort TensorFlow under mock_data: no split sizes.)
    reference = _stack(tfds.as_numpy(tfds.load("cifar10", split="test")))
    reference_train = _stack(tfds.as_numpy(tfds.load("cifar10",
                                                     split="train")))
    # 'auto' with no local files in data_dir goes to tfds.
    mnist = bd.load_dataset("mnist", "train", data_dir=tmp_path)
  assert ds.images.shape == (12, 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32 and ds.num_classes == 10
  np.testing.assert_array_equal(ds.images, reference["image"])
  np.testing.assert_array_equal(ds.labels, reference["label"])
  x = reference_train["image"] / 255.0
  np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=STATS_RTOL)
  np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=STATS_RTOL)
  assert mnist.images.shape == (12, 28, 28, 1) and mnist.labels.max() < 10


def test_tfds_and_local_files_hold_the_same_mnist(tfds_module, shared_data_dir,
                                                  tmp_path):
  """tfds prepares MNIST offline from the same IDX files (manual_dir)."""
  tfds = tfds_module
  builder = tfds.builder("mnist", data_dir=str(tmp_path))
  # Only the first 300 examples of each split (in the files' order): building
  # all 70,000 takes 20-90 s here.
  count = 300
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(shared_data_dir / "mnist"),
      max_examples_per_split=count))
  from_tfds = bd.load_dataset("mnist", "test", data_dir=tmp_path,
                              source="tfds")
  local = bd.load_dataset("mnist", "test", data_dir=shared_data_dir,
                          source="local")
  assert from_tfds.images.shape == (count, 28, 28, 1)
  assert from_tfds.labels.dtype == np.int32
  # tfds stores the examples in its own (fixed) order: compare as sets.
  np.testing.assert_array_equal(
      _rows_as_set(from_tfds.images, from_tfds.labels),
      _rows_as_set(local.images[:count], local.labels[:count]))
  # Same train examples -> bit-identical statistics.
  train = bd.load_dataset("mnist", "train", data_dir=shared_data_dir,
                          source="local")
  mean, std = bd.channel_stats(train.images[:count])
  np.testing.assert_array_equal(from_tfds.mean, mean)
  np.testing.assert_array_equal(from_tfds.std, std)


# --------------------------------------------------------------------------
# Pipeline


def _collect(batches):
  batches = list(batches)
  return batches, [b["label"][b["mask"]] for b in batches]


def test_shuffling_is_deterministic_and_differs_per_epoch():
  ds = _toy_dataset()
  run = lambda **kw: np.concatenate(
      [b["label"] for b in bd.epoch_batches(ds, 5, **kw)])
  first = run(seed=0, epoch=0)
  np.testing.assert_array_equal(first, run(seed=0, epoch=0))
  assert not np.array_equal(first, run(seed=0, epoch=1))
  assert not np.array_equal(first, run(seed=1, epoch=0))
  np.testing.assert_array_equal(run(seed=0, epoch=0, shuffle=False),
                                np.arange(20))


@pytest.mark.parametrize("remainder,sizes", [
    ("drop", [5, 5, 5, 5]),
    ("keep", [5, 5, 5, 5, 3]),
    ("pad", [5, 5, 5, 5, 5]),
])
def test_every_example_once_per_epoch(remainder, sizes):
  ds = _toy_dataset(n=23)
  batches, kept = _collect(bd.epoch_batches(ds, 5, seed=3, epoch=2,
                                            remainder=remainder))
  assert [len(b["label"]) for b in batches] == sizes
  assert len(batches) == bd.num_batches(ds, 5, remainder)
  seen = np.concatenate(kept)
  assert len(np.unique(seen)) == len(seen)  # nothing twice
  assert len(seen) == (20 if remainder == "drop" else 23)
  for b in batches:
    assert b["image"].dtype == np.float32 and b["image"].shape[1:] == (6, 5, 3)
    assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
  if remainder == "pad":
    last = batches[-1]
    np.testing.assert_array_equal(last["mask"], [True] * 3 + [False] * 2)
    assert not last["image"][3:].any() and not last["label"][3:].any()
    assert all(b["mask"].all() for b in batches[:-1])
    np.testing.assert_array_equal(np.sort(seen), np.arange(23))


@pytest.mark.parametrize("seed,epoch", [(0, 0), (3, 5), (5, 3), (7, 1)])
def test_epoch_order_and_augmentation_are_the_documented_draws(seed, epoch):
  # The module docstring's definition, computed here independently: order,
  # offsets and flips drawn from np.random.default_rng([seed, epoch]) in that
  # order; crops taken by hand from an explicitly padded image. (A shuffle
  # seeded by seed + epoch, say, gives (3, 5) and (5, 3) the same order and
  # fails here.)
  ds = _toy_dataset(n=23, shape=(6, 7, 2), seed=seed)
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(23)
  offsets = rng.integers(0, 9, size=(23, 2))
  flips = rng.random(23) < 0.5
  batches = list(bd.epoch_batches(ds, 5, seed=seed, epoch=epoch,
                                  augment=True, normalize=False,
                                  remainder="keep"))
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in batches]), order)
  images = np.concatenate([b["image"] for b in batches])
  for position, example in enumerate(order):
    padded = np.zeros((6 + 8, 7 + 8, 2), np.uint8)
    padded[4:10, 4:11] = ds.images[example]
    dy, dx = offsets[position]
    crop = padded[dy:dy + 6, dx:dx + 7]
    if flips[position]:
      crop = crop[:, ::-1]
    np.testing.assert_array_equal(images[position],
                                  (crop / 255.0).astype(np.float32))
  # Without augmentation the order is the same permutation (first draw).
  plain = np.concatenate([b["label"] for b in bd.epoch_batches(
      ds, 5, seed=seed, epoch=epoch, remainder="keep")])
  np.testing.assert_array_equal(plain, order)


def test_resume_mid_epoch_with_start_batch():
  ds = _toy_dataset(n=23, shape=(6, 6, 1))
  kwargs = dict(seed=5, epoch=1, augment=True, remainder="pad")
  full = list(bd.epoch_batches(ds, 4, **kwargs))
  rest = list(bd.epoch_batches(ds, 4, start_batch=2, **kwargs))
  assert len(rest) == len(full) - 2
  for a, b in zip(full[2:], rest):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert list(bd.epoch_batches(ds, 4, start_batch=len(full), **kwargs)) == []


def test_batch_size_one():
  ds = _toy_dataset(n=7)
  batches = list(bd.epoch_batches(ds, 1, seed=0, epoch=0))
  assert len(batches) == 7 and all(b["image"].shape == (1, 6, 5, 3)
                                   for b in batches)
  np.testing.assert_array_equal(
      np.sort(np.concatenate([b["label"] for b in batches])), np.arange(7))


def test_normalization_values():
  ds = _toy_dataset(n=9)
  for normalize in (True, False):
    for b in bd.epoch_batches(ds, 3, seed=1, epoch=0, normalize=normalize):
      x = ds.images[b["label"]].astype(np.float64) / 255  # label == index
      if normalize:
        x = (x - ds.mean.astype(np.float64)) / ds.std.astype(np.float64)
      # The table: float64 values rounded once (see STATS_RTOL).
      np.testing.assert_allclose(b["image"], x, rtol=STATS_RTOL, atol=0)


def test_normalized_train_set_has_zero_mean_unit_std():
  ds = bd.load_dataset("digits", "train")
  images = np.concatenate([b["image"] for b in bd.epoch_batches(
      ds, 64, seed=0, epoch=0, remainder="keep")]).astype(np.float64)
  assert images.shape[0] == len(ds)
  # Exact (float64) would be 0 and 1; float32 rounding of the table entries
  # and of mean/std moves them by ~eps * max|x| / std ~ 1e-6 at most
  # (max|x| <= 4 here); 1e-5 keeps a 10x margin.
  np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_crop_and_flip_equals_shifted_original():
  images = np.random.default_rng(7).integers(1, 256, (3, 6, 5, 2),
                                             dtype=np.uint8)
  offsets = np.array([[4, 4], [5, 2], [0, 8]])  # identity, (+1,-2), (-4,+4)
  out = bd.crop_and_flip(images, offsets, np.array([False, False, True]))
  np.testing.assert_array_equal(out[0], images[0])
  # Shift by (dy, dx) = offset - 4: out[r, c] = image[r + dy, c + dx], 0 off.
  expected = np.zeros_like(images[1])
  expected[:5, 2:] = images[1][1:, :3]
  np.testing.assert_array_equal(out[1], expected)
  shifted = np.zeros_like(images[2])
  shifted[4:, :1] = images[2][:2, 4:]
  np.testing.assert_array_equal(out[2], shifted[:, ::-1])


def test_augmentation_is_a_padded_crop_or_its_mirror():
  ds = _toy_dataset(n=96, shape=(8, 8, 1), seed=11)
  batches = list(bd.epoch_batches(ds, 32, seed=2, epoch=0, augment=True,
                                  normalize=False))
  again = list(bd.epoch_batches(ds, 32, seed=2, epoch=0, augment=True,
                                normalize=False))
  np.testing.assert_array_equal(batches[0]["image"], again[0]["image"])
  drawn = []
  for b in batches:
    assert b["image"].shape == (32, 8, 8, 1)
    for image, label in zip(b["image"], b["label"]):
      got = np.rint(image * 255).astype(np.uint8)
      padded = np.pad(ds.images[label], ((4, 4), (4, 4), (0, 0)))
      matches = [(dy, dx, flip) for dy in range(9) for dx in range(9)
                 for flip in (False, True)
                 if np.array_equal(got, padded[dy:dy + 8, dx:dx + 8][
                     :, ::-1 if flip else 1])]
      assert matches, f"example {label} is no crop/flip of its original"
      drawn.append(matches[0])
  drawn = np.array(drawn)
  # Random offsets cover the range on both axes; about half are mirrored.
  assert len(np.unique(drawn[:, 0])) >= 7 and len(np.unique(drawn[:, 1])) >= 7
  assert 0.3 < drawn[:, 2].mean() < 0.7


def test_bad_pipeline_arguments():
  ds = _toy_dataset(n=10)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    bd.epoch_batches(ds, 0, seed=0, epoch=0)
  with pytest.raises(TypeError, match="batch_size must be an int"):
    bd.epoch_batches(ds, 2.0, seed=0, epoch=0)
  with pytest.raises(TypeError, match="batch_size must be an int"):
    bd.epoch_batches(ds, True, seed=0, epoch=0)
  with pytest.raises(ValueError, match="remainder must be one of"):
    bd.epoch_batches(ds, 2, seed=0, epoch=0, remainder="wrap")
  with pytest.raises(ValueError, match="seed must be >= 0"):
    bd.epoch_batches(ds, 2, seed=-1, epoch=0)
  with pytest.raises(ValueError, match="epoch must be >= 0"):
    bd.epoch_batches(ds, 2, seed=0, epoch=-3)
  with pytest.raises(ValueError, match="no batches"):
    bd.epoch_batches(ds, 11, seed=0, epoch=0)
  with pytest.raises(ValueError, match="start_batch"):
    bd.epoch_batches(ds, 2, seed=0, epoch=0, start_batch=6)
  with pytest.raises(TypeError, match="augment must be a bool"):
    bd.epoch_batches(ds, 2, seed=0, epoch=0, augment="yes")
  with pytest.raises(TypeError, match="ArrayDataset"):
    bd.epoch_batches(ds.images, 2, seed=0, epoch=0)
  with pytest.raises(ValueError, match="remainder"):
    bd.num_batches(ds, 2, "nope")
  assert bd.num_batches(10, 3, "drop") == 3 and bd.num_batches(10, 3,
                                                               "pad") == 4


# --------------------------------------------------------------------------
# Prefetching to devices


def _counting(iterable, counter):
  for item in iterable:
    counter.append(1)
    yield item


def test_prefetch_to_single_device_is_bounded_and_exact():
  ds = _toy_dataset(n=20)
  host = list(bd.epoch_batches(ds, 4, seed=0, epoch=0))
  pulled = []
  stream = bd.prefetch_to_device(
      _counting(bd.epoch_batches(ds, 4, seed=0, epoch=0), pulled), size=2)
  first = next(stream)
  assert len(pulled) == 2  # `size` batches in flight, no more
  on_device = [first] + list(stream)
  assert len(on_device) == len(host)
  for h, d in zip(host, on_device):
    for key in h:
      assert isinstance(d[key], jax.Array)
      np.testing.assert_array_equal(np.asarray(d[key]), h[key])


def test_prefetch_with_data_parallel_sharding():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS="
                "--xla_force_host_platform_device_count=8)")
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  ds = _toy_dataset(n=40)
  host = list(bd.epoch_batches(ds, 16, seed=4, epoch=1, remainder="pad"))
  on_device = list(bd.prefetch_to_device(
      bd.epoch_batches(ds, 16, seed=4, epoch=1, remainder="pad"), size=3,
      sharding=sharding))
  assert len(on_device) == len(host) == 3
  for h, d in zip(host, on_device):
    for key in h:
      assert d[key].sharding == sharding
      np.testing.assert_array_equal(np.asarray(d[key]), h[key])
      for shard in d[key].addressable_shards:
        assert shard.data.shape[0] == 2  # 16 examples over 8 devices
        np.testing.assert_array_equal(np.asarray(shard.data),
                                      h[key][shard.index])
  with pytest.raises(ValueError, match="divisible"):
    next(bd.prefetch_to_device(
        bd.epoch_batches(ds, 12, seed=0, epoch=0), sharding=sharding))


def test_prefetch_bad_arguments():
  with pytest.raises(ValueError, match="size must be >= 1"):
    bd.prefetch_to_device(iter([]), size=0)
  with pytest.raises(TypeError, match="sharding"):
    bd.prefetch_to_device(iter([]), sharding="gpu")
