"""ResNet-18 (CIFAR variant: 3x3 stem, no max-pool) on CIFAR-10.

The CBN paper's backbone, trained with the recipe of ``cifar10_resnet20.py``
(SGD momentum 0.9, lr 0.1 with warm-up and cosine decay, batch 128,
augmentation) for 100 epochs with weight decay 5e-4.
``--config.data_parallel=True`` splits the batch over all local devices with
SyncBN.

Tiny setting for tests: ``--config.num_train_steps=2
--config.model_kwargs.width=4 --config.batch_size=8``.
"""
import os
import runpy

import ml_collections

# Run by path: configs/ is not an importable package wherever train.py runs.
_RESNET20_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "cifar10_resnet20.py")


def get_config() -> ml_collections.ConfigDict:
  config = runpy.run_path(_RESNET20_CONFIG)["get_config"]()
  config.model = "resnet18"
  config.model_kwargs = ml_collections.ConfigDict(dict(width=64))
  config.norm_kwargs.gn.update(num_groups=32)
  config.norm_kwargs.cbn.update(window=8, burn_in=5000)
  config.num_epochs = 100.0
  config.weight_decay = 5e-4
  return config
