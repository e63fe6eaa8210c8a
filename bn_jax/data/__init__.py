"""bn_jax.data: datasets (scikit-learn digits, local standard files, tfds) and
the input pipelines: on the host (deterministic shuffling, batching,
augmentation, prefetch) and on the device (`batch_at`, pure in (seed, step)).

Imports nothing from bn_jax.models / training / nn.
"""
from bn_jax.data.datasets import ArrayDataset
from bn_jax.data.datasets import channel_stats
from bn_jax.data.datasets import clear_stats_cache
from bn_jax.data.datasets import DATA_DIR_ENV
from bn_jax.data.datasets import DatasetNotFoundError
from bn_jax.data.datasets import DATASETS
from bn_jax.data.datasets import dataset_shape
from bn_jax.data.datasets import default_data_dir
from bn_jax.data.datasets import load_dataset
from bn_jax.data.datasets import read_cifar_bin
from bn_jax.data.datasets import read_idx
from bn_jax.data.datasets import read_idx_split
from bn_jax.data.device_pipeline import batch_at
from bn_jax.data.device_pipeline import DeviceDataset
from bn_jax.data.device_pipeline import put_on_device
from bn_jax.data.pipeline import crop_and_flip
from bn_jax.data.pipeline import epoch_batches
from bn_jax.data.pipeline import normalization_table
from bn_jax.data.pipeline import normalize_images
from bn_jax.data.pipeline import num_batches
from bn_jax.data.pipeline import prefetch_to_device
from bn_jax.data.pipeline import REMAINDERS

__all__ = [
    "ArrayDataset", "channel_stats", "clear_stats_cache", "DATA_DIR_ENV",
    "DatasetNotFoundError", "DATASETS", "dataset_shape", "default_data_dir", "load_dataset",
    "read_cifar_bin", "read_idx", "read_idx_split", "crop_and_flip",
    "epoch_batches", "normalization_table", "normalize_images", "num_batches",
    "prefetch_to_device", "REMAINDERS", "batch_at", "DeviceDataset",
    "put_on_device",
]
