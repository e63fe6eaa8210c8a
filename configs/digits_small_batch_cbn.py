"""Small-batch CBN on the offline digits data (runs in seconds on a CPU).

The sigmoid MLP of ``default.py`` (plain SGD, constant learning rate) at
batch 4 per step: BN's statistics over 4 samples are noisy; CBN averages them
over a window of 4 compensated iterations; GN and LN do not depend on the
batch. Tiny setting for tests:
``--config.num_train_steps=20 --config.model_kwargs.hidden=(16,16)``.
"""
import os
import runpy

import ml_collections

# Run by path: configs/ is not an importable package wherever train.py runs.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "default.py")


def get_config() -> ml_collections.ConfigDict:
  config = runpy.run_path(_DEFAULT_CONFIG)["get_config"]()
  config.parts = ml_collections.ConfigDict()  # one part: this config
  config.norms = ("bn", "cbn", "ln", "gn")
  config.norm_kwargs.cbn.update(window=4, burn_in=300)
  config.norm_kwargs.gn.update(num_groups=10)
  config.batch_size = 4
  config.num_train_steps = 3000
  config.learning_rate = 0.2
  config.log_every = 100
  config.eval_every = 250
  config.checkpoint_every = 1500
  return config
