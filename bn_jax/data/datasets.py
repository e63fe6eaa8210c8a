"""Image-classification datasets as in-memory NumPy arrays.

`load_dataset(name, split)` returns an `ArrayDataset`: uint8 NHWC images,
int32 labels, and the per-channel statistics of the TRAIN split

  mean_c = E[x / 255],   std_c = sqrt(E[(x / 255 - mean_c)^2])

(population std over every pixel of every training image of channel c), which
the input pipeline uses to normalize every split.

Where the arrays come from (`source`):

* ``'local'``: the publishers' standard files in a directory (the layout of the
  project's ``../shared/data``):
    - MNIST / Fashion-MNIST: the four IDX files ``train-images-idx3-ubyte.gz``,
      ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
      ``t10k-labels-idx1-ubyte.gz`` (gzipped or not), in ``data_dir/mnist/``
      (``data_dir/fashion-mnist/``) or directly in ``data_dir``;
    - CIFAR-10: the binary version, ``cifar-10-batches-bin/data_batch_{1..5}.bin``
      and ``test_batch.bin`` (or these files directly in ``data_dir``);
    - CIFAR-100: the binary version, ``cifar-100-binary/{train,test}.bin`` (the
      fine label is the label).
  Examples come in the publisher's order (CIFAR-10 train: batch 1 .. 5).
* ``'tfds'``: tensorflow-datasets (`tfds.builder(name, data_dir=...)`,
  downloading when online). Needs TensorFlow (imported lazily, GPUs hidden from
  it so that it leaves accelerator memory to JAX). The examples are the same
  as in the standard files but in tfds' own fixed order (tfds shuffles
  deterministically when it prepares a dataset).
* ``'auto'``: local files when they are found in ``data_dir``, else tfds.

``data_dir`` defaults to the environment variable ``BN_JAX_DATA_DIR``, else
``<repo>/../shared/data`` when that directory exists. tfds receives ``data_dir``
only when the caller gave one (otherwise tfds uses its own default,
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

``'digits'`` is scikit-learn's bundled 8x8 handwritten digits (no download):
pixel values 0..16 rescaled to 0..255 (``round(v * 255 / 16)``), shape
(N, 8, 8, 1). Split (deterministic, stratified, no random numbers): within each
class, in scikit-learn's order, the k-th example goes to 'test' when
``k % 5 == 4`` and to 'train' otherwise (1442 train / 355 test).
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import os
import pathlib
import socket
import threading
import urllib.parse
from typing import Any, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
SPLITS = ("train", "test")
SOURCES = ("auto", "local", "tfds")
DATA_DIR_ENV = "BN_JAX_DATA_DIR"

# <repo>/bn_jax/data/datasets.py -> <repo>/../shared/data
_SHARED_DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"

# IDX magic numbers: 0x00 0x00 <type code> <number of dimensions>.
IDX_IMAGES_MAGIC = 2051  # unsigned byte, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 2049  # unsigned byte, 1 dimension (count)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4",
               0x0D: ">f4", 0x0E: ">f8"}

_CIFAR_IMAGE_BYTES = 32 * 32 * 3


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is neither in local standard files nor available from tfds."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  num_classes: int
  kind: str  # 'digits' | 'idx' | 'cifar10' | 'cifar100'
  tfds_name: Optional[str]
  subdirs: tuple[str, ...]  # where the standard files live under data_dir
  files_help: str
  image_shape: tuple[int, int, int] = (0, 0, 0)  # (H, W, C)


_SPECS = {
    "digits": _Spec(10, "digits", None, (), "bundled with scikit-learn",
                    image_shape=(8, 8, 1)),
    "mnist": _Spec(
        10, "idx", "mnist", ("mnist",),
        "the MNIST IDX files (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz) in DIR/mnist/ or DIR",
        image_shape=(28, 28, 1)),
    "fashion_mnist": _Spec(
        10, "idx", "fashion_mnist", ("fashion-mnist", "fashion_mnist"),
        "the Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz) in DIR/fashion-mnist/ or DIR",
        image_shape=(28, 28, 1)),
    "cifar10": _Spec(
        10, "cifar10", "cifar10", ("cifar-10-batches-bin",),
        "the CIFAR-10 binary version (data_batch_1.bin .. data_batch_5.bin, "
        "test_batch.bin) in DIR/cifar-10-batches-bin/ or DIR",
        image_shape=(32, 32, 3)),
    "cifar100": _Spec(
        100, "cifar100", "cifar100", ("cifar-100-binary",),
        "the CIFAR-100 binary version (train.bin, test.bin) in "
        "DIR/cifar-100-binary/ or DIR", image_shape=(32, 32, 3)),
}


def dataset_shape(name: str) -> tuple[tuple[int, int, int], int]:
  """``(image_shape (H, W, C), num_classes)`` of dataset ``name``, without
  loading it (config validation builds the model on it first)."""
  if name not in _SPECS:
    raise ValueError(f"dataset name={name!r} is not known; valid choices are "
                     f"{DATASETS}.")
  return _SPECS[name].image_shape, _SPECS[name].num_classes


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """One split of a dataset, in host memory.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int32 [N], in ``[0, num_classes)``.
    num_classes: number of classes.
    mean: float32 [C], per-channel mean of the TRAIN split's ``images / 255``.
    std: float32 [C], per-channel (population) std of the TRAIN split's
      ``images / 255``.
    name: dataset name.
    split: 'train' or 'test' (free text for hand-made datasets).
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  name: str
  split: str = "train"

  def __post_init__(self):
    images, labels = self.images, self.labels
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or (
        images.ndim != 4):
      raise TypeError("ArrayDataset: images must be a uint8 numpy array of "
                      f"shape [N, H, W, C], got {_describe(images)}")
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or (
        labels.ndim != 1):
      raise TypeError("ArrayDataset: labels must be an int32 numpy array of "
                      f"shape [N], got {_describe(labels)}")
    if labels.shape[0] != images.shape[0]:
      raise ValueError(f"ArrayDataset: {images.shape[0]} images but "
                       f"{labels.shape[0]} labels")
    if isinstance(self.num_classes, bool) or not isinstance(
        self.num_classes, (int, np.integer)) or self.num_classes < 1:
      raise ValueError("ArrayDataset: num_classes must be a positive int, got "
                       f"{self.num_classes!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(
          f"ArrayDataset: labels must lie in [0, {self.num_classes}), got "
          f"range [{labels.min()}, {labels.max()}]")
    channels = images.shape[-1]
    for field in ("mean", "std"):
      value = getattr(self, field)
      if not isinstance(value, np.ndarray) or value.dtype != np.float32 or (
          value.shape != (channels,)):
        raise TypeError(f"ArrayDataset: {field} must be a float32 numpy array "
                        f"of shape ({channels},), got {_describe(value)}")
    if not np.all(self.std > 0):
      raise ValueError(f"ArrayDataset: std must be positive, got {self.std}")

  def __len__(self) -> int:
    return self.images.shape[0]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C)."""
    return tuple(self.images.shape[1:])


def _describe(value: Any) -> str:
  if isinstance(value, np.ndarray):
    return f"array of shape {value.shape} and dtype {value.dtype}"
  return repr(type(value))


# --------------------------------------------------------------------------
# Statistics


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and population std of ``images / 255`` (float32 [C]).

  Computed exactly from a 256-bin histogram per channel (float64 sums of
  integer counts), which is cheap for 150M CIFAR pixels and avoids any
  float accumulation error: mean = sum_v p(v) v/255, var = sum_v p(v)
  (v/255 - mean)^2.
  """
  if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or (
      images.ndim != 4) or images.shape[0] == 0:
    raise TypeError("channel_stats: images must be a non-empty uint8 array of "
                    f"shape [N, H, W, C], got {_describe(images)}")
  channels = images.shape[-1]
  pixels = images.reshape(-1, channels)
  levels = np.arange(256, dtype=np.float64) / 255.0
  mean = np.empty(channels, np.float64)
  std = np.empty(channels, np.float64)
  for c in range(channels):
    counts = np.bincount(pixels[:, c], minlength=256).astype(np.float64)
    prob = counts / counts.sum()
    mean[c] = prob @ levels
    std[c] = np.sqrt(prob @ (levels - mean[c]) ** 2)
  return mean.astype(np.float32), std.astype(np.float32)


# Train-split statistics, computed once per (source, dataset, location).
_STATS_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_STATS_LOCK = threading.Lock()


def _cached_stats(key: tuple, load_train_images) -> tuple[np.ndarray,
                                                          np.ndarray]:
  with _STATS_LOCK:
    if key in _STATS_CACHE:
      return _STATS_CACHE[key]
  stats = channel_stats(load_train_images())
  with _STATS_LOCK:
    _STATS_CACHE[key] = stats
  return stats


def clear_stats_cache() -> None:
  """Forget the cached train-split statistics (e.g. after files changed)."""
  with _STATS_LOCK:
    _STATS_CACHE.clear()


# --------------------------------------------------------------------------
# Standard file formats


def read_idx(path: PathLike, expected_magic: Optional[int] = None
             ) -> np.ndarray:
  """Reads one IDX file (gzipped when the name ends in .gz).

  Header (big-endian): two zero bytes, a type code (0x08 = uint8), the number
  of dimensions d (the magic number is these 4 bytes read as a uint32: 2051
  for MNIST images, 2049 for labels), then d uint32 sizes; then the data.
  Raises ValueError for a bad or unexpected magic, an unknown type or a
  payload whose length does not match the header.
  """
  path = pathlib.Path(path)
  opener = gzip.open if path.name.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      magic = f.read(4)
      if len(magic) != 4 or magic[0] != 0 or magic[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic bytes {magic!r})")
      if expected_magic is not None and int.from_bytes(
          magic, "big") != expected_magic:
        raise ValueError(f"{path}: IDX magic number "
                         f"{int.from_bytes(magic, 'big')}, expected "
                         f"{expected_magic}")
      if magic[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code {magic[2]:#04x}")
      dtype = np.dtype(_IDX_DTYPES[magic[2]])
      ndim = magic[3]
      header = f.read(4 * ndim)
      if len(header) != 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
      shape = tuple(int(s) for s in np.frombuffer(header, ">u4"))
      data = np.empty(shape, dtype)
      view = memoryview(data.reshape(-1).view(np.uint8))
      filled = 0
      while filled < data.nbytes:  # readinto may return short reads
        got = f.readinto(view[filled:])
        if not got:
          break
        filled += got
      if filled != data.nbytes:
        raise ValueError(
            f"{path}: truncated IDX data: header says {shape} "
            f"({data.nbytes} bytes), file has {filled}")
      if f.read(1):
        raise ValueError(f"{path}: trailing bytes after the IDX data of "
                         f"shape {shape}")
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"{path}: corrupt file ({e})") from e
  return data.astype(dtype.newbyteorder("="), copy=False)


def read_idx_split(images_path: PathLike,
                   labels_path: PathLike) -> tuple[np.ndarray, np.ndarray]:
  """MNIST-style image and label IDX files -> (uint8 [N,H,W,1], int32 [N])."""
  images = read_idx(images_path, IDX_IMAGES_MAGIC)
  labels = read_idx(labels_path, IDX_LABELS_MAGIC)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{images_path} holds {images.shape[0]} images but "
                     f"{labels_path} holds {labels.shape[0]} labels")
  return images[..., None], labels.astype(np.int32)


def read_cifar_bin(path: PathLike, *, label_bytes: int = 1,
                   label_index: int = 0,
                   num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """CIFAR binary batch -> (uint8 [N,32,32,3], int32 [N]).

  Each record: `label_bytes` label bytes (CIFAR-10: 1; CIFAR-100: coarse, fine)
  then 3072 pixel bytes: the 1024 red, 1024 green, 1024 blue values of a
  32x32 image in row-major order.
  """
  path = pathlib.Path(path)
  record = label_bytes + _CIFAR_IMAGE_BYTES
  raw = np.fromfile(path, np.uint8)
  if raw.size == 0 or raw.size % record:
    raise ValueError(f"{path}: size {raw.size} bytes is not a positive "
                     f"multiple of the {record}-byte CIFAR record")
  raw = raw.reshape(-1, record)
  labels = raw[:, label_index].astype(np.int32)
  if labels.max() >= num_classes:
    raise ValueError(f"{path}: label {labels.max()} out of range "
                     f"[0, {num_classes}); corrupt file?")
  images = raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def _idx_file(directory: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
  for name in (stem + ".gz", stem):
    if (directory / name).is_file():
      return directory / name
  return None


def _local_files(spec: _Spec, data_dir: pathlib.Path
                 ) -> Optional[dict[str, list[pathlib.Path]]]:
  """{split: files} for the first candidate directory holding the dataset.

  Returns None when no candidate holds any of the files; raises
  DatasetNotFoundError when one holds only some of them (rather than silently
  falling back to tfds).
  """
  for directory in [data_dir / s for s in spec.subdirs] + [data_dir]:
    if not directory.is_dir():
      continue
    if spec.kind == "idx":
      wanted = {
          "train": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
          "test": ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]}
      found = {split: [_idx_file(directory, stem) for stem in stems]
               for split, stems in wanted.items()}
    else:
      wanted = ({"train": [f"data_batch_{i}.bin" for i in range(1, 6)],
                 "test": ["test_batch.bin"]} if spec.kind == "cifar10" else
                {"train": ["train.bin"], "test": ["test.bin"]})
      found = {split: [directory / n if (directory / n).is_file() else None
                       for n in names] for split, names in wanted.items()}
    present = [p for paths in found.values() for p in paths if p is not None]
    if not present:
      continue
    missing = [stem for split, stems in wanted.items()
               for stem, p in zip(stems, found[split]) if p is None]
    if missing:
      raise DatasetNotFoundError(
          f"{directory} holds some but not all standard files of "
          f"{spec.tfds_name}: missing {missing}")
    return found
  return None


def _load_local_split(spec: _Spec, files: list[pathlib.Path]
                      ) -> tuple[np.ndarray, np.ndarray]:
  if spec.kind == "idx":
    return read_idx_split(*files)
  if spec.kind == "cifar10":
    parts = [read_cifar_bin(f) for f in files]
  else:
    parts = [read_cifar_bin(f, label_bytes=2, label_index=1,
                            num_classes=100) for f in files]
  if len(parts) == 1:
    return parts[0]
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]))


# --------------------------------------------------------------------------
# scikit-learn digits


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits ``(images float64 [1797, 8, 8], target)``, read
  once per process.

  Parsed from the file ``sklearn.datasets.load_digits`` parses
  (``sklearn/datasets/data/digits.csv.gz``, ``np.loadtxt`` with ',': the
  same values) without importing scikit-learn, whose import (SciPy and
  more) costs seconds; ``load_digits`` itself if the file is not there.
  """
  spec = importlib.util.find_spec("sklearn")
  path = (os.path.join(spec.submodule_search_locations[0], "datasets",
                       "data", "digits.csv.gz")
          if spec is not None and spec.submodule_search_locations else "")
  if not os.path.isfile(path):
    from sklearn.datasets import load_digits  # lazy: only digits users pay
    bunch = load_digits()
    return bunch.images, bunch.target
  with gzip.open(path, mode="rt", encoding="utf-8") as f:
    data = np.loadtxt(f, delimiter=",")
  return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  digit_images, target = _sklearn_digits()
  images = np.rint(digit_images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = target.astype(np.int32)
  # Rank of each example within its class, in scikit-learn's order.
  rank = np.empty(labels.shape[0], np.int64)
  for c in np.unique(labels):
    where = np.flatnonzero(labels == c)
    rank[where] = np.arange(where.size)
  selected = (rank % 5 == 4) if split == "test" else (rank % 5 != 4)
  return images[selected], labels[selected]


# --------------------------------------------------------------------------
# tensorflow-datasets


def _import_tensorflow_without_gpus():
  """Imports TensorFlow with GPUs hidden, so it leaves their memory to JAX."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices were already initialised by someone else
    pass
  return tf


_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                    "https_proxy", "all_proxy")


def _check_download_reachable(builder, timeout: float = 5.0) -> None:
  """Fails fast when the dataset's download host cannot be reached.

  Without network, tfds retries each URL with exponential backoff for about
  3.5 minutes before it gives up; one TCP connection attempt tells the same
  in seconds. Skipped behind a proxy, where a direct connection proves
  nothing.
  """
  if any(os.environ.get(v) for v in _PROXY_VARIABLES):
    return
  try:
    urls = list(builder.url_infos or ())
  except Exception:  # pylint: disable=broad-except
    return  # no registered URLs: let tfds decide
  if not urls:
    return
  parsed = urllib.parse.urlparse(urls[0])
  if not parsed.hostname:
    return
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=timeout).close()
  except OSError as e:
    raise DatasetNotFoundError(
        f"tfds would download {builder.name} from {parsed.hostname}, which "
        f"cannot be reached ({e})") from e


def _tfds_builder(spec: _Spec, data_dir: Optional[PathLike]):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetNotFoundError(f"tensorflow-datasets is not installed ({e})"
                               ) from e
  builder = tfds.builder(spec.tfds_name,
                         data_dir=None if data_dir is None else str(data_dir))
  if not builder.is_prepared():
    _check_download_reachable(builder)
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetNotFoundError(
          f"tfds could not download and prepare {spec.tfds_name}: "
          f"{type(e).__name__}: {e}") from e
  return builder


def _tfds_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    _import_tensorflow_without_gpus()
  except ImportError as e:
    raise DatasetNotFoundError(
        "reading a tfds dataset needs TensorFlow (pip install tensorflow-cpu) "
        f"({e})") from e
  # Fixed-size batches rather than batch_size=-1: the latter batches by
  # info.splits' example count, which is unknown for some builders (then
  # sys.maxsize, which makes TensorFlow abort the process).
  parts = list(tfds.as_numpy(builder.as_dataset(split=split).batch(8192)))
  if not parts:
    raise ValueError(f"tfds {builder.name}/{split} is empty")
  data = {key: np.concatenate([p[key] for p in parts]) for key in
          ("image", "label")}
  images = data["image"]
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"tfds {builder.name}/{split}: expected uint8 NHWC "
                     f"images, got {_describe(images)}")
  return np.ascontiguousarray(images), np.asarray(data["label"]).astype(
      np.int32)


# --------------------------------------------------------------------------
# Entry point


def default_data_dir() -> Optional[pathlib.Path]:
  """``$BN_JAX_DATA_DIR``, else ``<repo>/../shared/data`` if it exists."""
  from_env = os.environ.get(DATA_DIR_ENV)
  if from_env:
    return pathlib.Path(from_env).expanduser()
  return _SHARED_DATA if _SHARED_DATA.is_dir() else None


def _not_found_message(name: str, spec: _Spec,
                       local_dir: Optional[pathlib.Path],
                       reasons: list[str]) -> str:
  looked = (f"looked in {local_dir}" if local_dir is not None else
            f"no data_dir given, ${DATA_DIR_ENV} unset and {_SHARED_DATA} "
            "absent")
  lines = [
      f"Dataset {name!r} is not available. Provide it in one of two ways:",
      f"  1. Standard files: put {spec.files_help} and "
      f"pass DIR as data_dir (train.py: --config.data_dir=DIR, or set "
      f"${DATA_DIR_ENV}); {looked}.",
      f"  2. tensorflow-datasets: with internet access, tfds downloads "
      f"'{spec.tfds_name}' itself (source='tfds' or 'auto'; needs "
      f"tensorflow-cpu), or pass as data_dir a tfds data_dir where it is "
      f"already prepared (tfds.builder('{spec.tfds_name}', "
      f"data_dir=DIR).download_and_prepare()).",
  ]
  lines += [f"  ({reason})" for reason in reasons]
  return "\n".join(lines)


def load_dataset(name: str, split: str, *, data_dir: Optional[PathLike] = None,
                 source: str = "auto") -> ArrayDataset:
  """Loads one split of a dataset into host memory.

  Args:
    name: one of `DATASETS` ('digits', 'mnist', 'fashion_mnist', 'cifar10',
      'cifar100').
    split: 'train' or 'test'.
    data_dir: directory with the standard files (see the module docstring), or
      a tfds data_dir. Defaults to `default_data_dir()` for local files and to
      tfds' own default for tfds.
    source: 'auto' (local files if found in data_dir, else tfds), 'local' or
      'tfds'. 'digits' always comes from scikit-learn ('tfds' is refused).

  Returns:
    ArrayDataset with uint8 NHWC images, int32 labels and the train split's
    per-channel mean/std of images/255 (computed once per dataset and cached).

  Raises:
    ValueError: unknown name, split or source; corrupt standard files.
    DatasetNotFoundError: (a FileNotFoundError) the dataset is in neither
      place; the message names both ways to provide it.
  """
  if name not in DATASETS:
    raise ValueError(f"load_dataset: name must be one of {DATASETS}, got "
                     f"{name!r}")
  if split not in SPLITS:
    raise ValueError(f"load_dataset: split must be one of {SPLITS}, got "
                     f"{split!r}")
  if source not in SOURCES:
    raise ValueError(f"load_dataset: source must be one of {SOURCES}, got "
                     f"{source!r}")
  if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError("load_dataset: data_dir must be a path or None, got "
                    f"{type(data_dir).__name__}")
  spec = _SPECS[name]

  if spec.kind == "digits":
    if source == "tfds":
      raise ValueError("load_dataset: 'digits' comes from scikit-learn; "
                       "source must be 'auto' or 'local', got 'tfds'")
    images, labels = _digits_arrays(split)
    mean, std = _cached_stats(("digits",),
                              lambda: _digits_arrays("train")[0])
    return ArrayDataset(images, labels, spec.num_classes, mean, std, name,
                        split)

  local_dir = (pathlib.Path(data_dir).expanduser() if data_dir is not None
               else default_data_dir())
  reasons = []
  if source in ("auto", "local"):
    files = None
    if local_dir is not None:
      try:
        files = _local_files(spec, local_dir)
      except DatasetNotFoundError as e:
        if source == "local":
          raise DatasetNotFoundError(
              _not_found_message(name, spec, local_dir, [str(e)])) from e
        reasons.append(str(e))
    if files is not None:
      images, labels = _load_local_split(spec, files[split])
      key = ("local", name) + tuple(str(p.resolve()) for p in files["train"])
      mean, std = _cached_stats(
          key, (lambda: images) if split == "train" else
          (lambda: _load_local_split(spec, files["train"])[0]))
      return ArrayDataset(images, labels, spec.num_classes, mean, std, name,
                          split)
    if source == "local":
      raise DatasetNotFoundError(
          _not_found_message(name, spec, local_dir,
                             reasons + ["source='local': tfds not tried"]))

  try:
    builder = _tfds_builder(spec, data_dir)
    images, labels = _tfds_split(builder, split)
    key = ("tfds", name, str(builder.data_dir))
    mean, std = _cached_stats(
        key, (lambda: images) if split == "train" else
        (lambda: _tfds_split(builder, "train")[0]))
  except DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        _not_found_message(name, spec, local_dir, reasons + [str(e)])) from e
  return ArrayDataset(images, labels, spec.num_classes, mean, std, name, split)
