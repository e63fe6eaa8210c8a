"""Experiment 4: CBN vs BN/GN/BRN/naive CBN at small batch sizes per step.

Run by ``experiments/cbn_small_batch.py``; ``get_config('cpu')`` (default) is
the reduced scale (81 runs: 3 seeds; 69 minutes on 2 CPU cores shared with
three other jobs, load average 8-12; about 1,700 s of CPU once compilations
are cached, see REPRODUCTION.md section 4),
``get_config('paper')`` the paper-like setting for a GPU (Yao et al., 2021:
ResNet-18, batch sizes 32..1 per iteration, window k = 8).

CPU scale (see REPRODUCTION.md, section 4): a ResNet of the ResNet-20 family
with ONE basic block per stage ("ResNet-8": stem, 3 stages x 1 block, head;
option-A shortcuts) at width 8 (channels 8/16/32), on CIFAR-10 downsampled
2x2 (average pooling) to 16x16, no augmentation; every run sees the same
number of training SAMPLES (``train_samples``), so small batches take more
(and noisier) steps; learning rate scaled linearly with the batch size;
every cell from ``seeds`` (mean and spread); evaluation on the full 10k test
set with the running statistics and with PreciseBN statistics.

Override anything with ``--config.<key>=<value>``, e.g.
``--config.batch_sizes='(8,2)' --config.methods='("bn","cbn")'``.
"""
import os
import runpy

import ml_collections

_SHARED = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "exp_common.py"))


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  c = _SHARED["new_config"](scale, dataset="cifar10")  # scale, seed, data_dir
  del c["seed"]                 # one per run, from `seeds`
  c.seeds = (0, 1, 2)           # every cell is trained from each
  c.downsample = 2              # average-pool factor of the images (1 = none)
  c.train_subset = 0            # > 0: first N training examples only
  c.augment = False             # random crop (pad 4) + flip
  c.eval_batch_size = 1000

  # Model: bn_jax.models.CifarResNet(stage_sizes, width, shortcut).
  c.stage_sizes = (1, 1, 1)
  c.width = 8
  c.shortcut = "A"

  # The grid: every method at every batch size (per step).
  # cbn: the library's defaults (momentum 0.9, gradient through the
  # compensation); cbn_nograd: the official code's gradient.
  c.methods = ("bn", "gn", "brn", "naive_cbn", "cbn", "cbn_nograd")
  # (32, 8, 2) x 3 seeds: a 5-size grid x 3 seeds did not fit the 15-minute
  # budget of a CPU-scale experiment on 2 cores.
  c.batch_sizes = (32, 8, 2)
  # naive CBN and CBN only at batch sizes <= this: all of them. (An earlier
  # run limited them to <= 8 because a step cost ~11-18x BN's on XLA:CPU. That
  # was not the Jacobians but a lax.cond bug: XLA:CPU ran the weight-gradient
  # convolutions inside the cond branch ~25x slower. Fixed in
  # bn_jax/core/cross_iteration_batch_norm.py; a CBN step now costs ~1.4-1.5x
  # BN's at batch 32 and ~2.1x at batch 2 for this model, see
  # benchmarks/RESULTS.md, "## bench_cbn".)
  c.cbn_max_batch_size = 32
  c.train_samples = 8192        # per run, whatever the batch size
  c.base_learning_rate = 0.1    # at base_batch_size; linear scaling
  c.base_batch_size = 32
  c.momentum = 0.9              # SGD heavy ball
  c.weight_decay = 0.0
  c.warmup_fraction = 0.05      # linear warm-up, then cosine decay to 0
  c.bn_momentum = 0.99          # BN/BRN running statistics (weight of the
                                # old value); CBN keeps its default, 0.9
  c.gn_num_groups = 4           # channels 8/16/32 -> 2/4/8 channels per group
  # Batch renorm: clip-limit schedule as fractions of the run's steps (the
  # paper's 5k warm-up, r_max -> 3 at 40k, d_max -> 5 at 25k, rescaled).
  c.brn_warmup_fraction = 0.05
  c.brn_r_max_fraction = 0.4
  c.brn_d_max_fraction = 0.25
  # CBN: window k (current batch + k-1 compensated past ones) and burn-in
  # (plain BN) as a fraction of the run's steps.
  c.cbn_window = 8
  c.cbn_burn_in_fraction = 0.25
  # Staleness of every CBN run's window, measured at these fractions of its
  # steps (after the burn-in: 0.3 is near the peak learning rate).
  c.staleness_fractions = (0.3, 0.6)

  # PreciseBN evaluation of every run with batch statistics: population
  # statistics of this many training samples, in batches of this size.
  c.precise_bn_samples = 1024
  c.precise_bn_batch_size = 128

  # Ablation of CBN at one batch size: other windows, other burn-ins.
  c.ablation_batch_size = 8
  c.ablation_windows = (2, 4)
  c.ablation_burn_in_fractions = (0.0,)

  c.log_every = 200             # steps between host syncs (NaN check, log)
  c.compilation_cache = True    # persistent XLA cache under the workdir

  if scale == "paper":
    # Yao et al. (2021): ResNet-18, per-iteration batch 32..1, k = 8. Here on
    # full-resolution CIFAR-10 with the CIFAR ResNet-18, ~30 epochs per run.
    c.downsample = 1
    c.augment = True
    c.stage_sizes = (2, 2, 2, 2)
    c.width = 64
    c.shortcut = "B"
    c.batch_sizes = (32, 16, 8, 4, 2, 1)
    c.train_samples = 1_500_000
    c.weight_decay = 1e-4
    c.gn_num_groups = 32
    c.ablation_windows = (2, 4, 16)
    c.ablation_burn_in_fractions = (0.0, 0.5)
    c.log_every = 1000
  return c
