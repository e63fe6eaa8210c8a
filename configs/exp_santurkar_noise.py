"""Experiment 3d: Santurkar et al. (2018), noisy BN at several noise scales.

The CIFAR-10 VGG recipe of exp_santurkar_vgg (same scale, data subsets,
optimizer and measurement points; see its docstring) with the standard
network, BN, and noisy BN under each of ``noise_settings``: the additive
form ``y + m_f + s_f z`` with ``m_f ~ U(-u, u)``, ``s_f ~ U(0, u)`` for
u = 0.1, 0.25, 0.5 (exp_santurkar_vgg's noisy BN is the additive form at
``m_f ~ U(-1, 1)``, ``s_f ~ U(0.5, 1.5)``), and the affine form
``y * s_f + m_f`` (each feature's distribution rescaled and shifted per
step) at two strengths. Measured: test accuracy and the pre-activation drift
(``santurkar_vgg.stability_summary``); no ICS or landscape probes.

The paper's claim: noisy BN's layer inputs are less stable than the standard
network's while it trains about as well as BN. The exact noise the paper used
is unverified (PAPERS.md), hence the sweep.
"""
import os
import runpy

import ml_collections

_SHARED = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "exp_common.py"))


def _noise(form: str, mean_range, std_range) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      noise_form=form, noise_mean_range=mean_range,
      noise_std_range=std_range))


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  return _SHARED["santurkar_vgg_config"](
      scale, norms=("none", "bn"), ics_norms=(), landscape_norms=(),
      noise_settings=ml_collections.ConfigDict(dict(
          additive_010=_noise("additive", (-0.1, 0.1), (0.0, 0.1)),
          additive_025=_noise("additive", (-0.25, 0.25), (0.0, 0.25)),
          additive_050=_noise("additive", (-0.5, 0.5), (0.0, 0.5)),
          affine_025=_noise("affine", (-0.25, 0.25), (0.75, 1.25)),
          affine_100=_noise("affine", (-1.0, 1.0), (0.5, 1.5)))))
