"""One source of truth for the training config (issue 8, item 2).

* Every norm module's keyword arguments are keys of ``base_config()`` with
  the module's defaults, overridable from the command line.
* Passing those declared defaults builds exactly the model that passing no
  ``norm_kwargs`` builds (same variables, same training-mode output): the
  declarations change nothing.
* A config error found only by building the model (GroupNorm's groups not
  dividing a layer's width) is reported by ``validate_config``, before any
  data is loaded, naming the key.
"""
import functools
import os

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from bn_jax.models import NORMS, create_model
from bn_jax.models import norms as norms_lib
from bn_jax.training import base_config, config_validation, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv, config_file="default.py"):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", os.path.join(REPO, "configs", config_file), flag_values=fv,
      sys_argv=argv, lock_config=True)
  fv(argv)
  return fv.config


def test_every_norm_argument_is_a_config_key_with_its_module_default():
  config = base_config()
  assert set(config.norm_kwargs.keys()) == set(NORMS) - {"none"}
  # Spot checks against the modules' documented defaults (bn_jax.nn).
  assert config.norm_kwargs.bn.momentum == 0.99
  assert config.norm_kwargs.bn.epsilon == 1e-5
  assert config.norm_kwargs.gn.num_groups is None  # per layer (models.norms)
  assert config.norm_kwargs.ghost.ghost_batch_size == 32
  assert config.norm_kwargs.lp.p == 2.0
  assert "window" in config.norm_kwargs.cbn
  assert "momentum" in config.norm_kwargs.cbn


def test_any_norm_argument_can_be_overridden_from_the_command_line():
  config = _parse(["train.py", "--config.norm_kwargs.cbn.momentum=0.5",
                   "--config.norm_kwargs.gn.num_groups=4",
                   "--config.norm_kwargs.lp.p=inf",
                   "--config.norm_kwargs.bn.use_scale=False"])
  assert config.norm_kwargs.cbn.momentum == 0.5
  assert config.norm_kwargs.gn.num_groups == 4
  assert config.norm_kwargs.lp.p == float("inf")
  assert config.norm_kwargs.bn.use_scale is False
  # The default config's own settings survive (it updates, not replaces).
  assert config.norm_kwargs.cbn.window == 4  # the module's default
  part = config.parts.small_batch.norm_kwargs.cbn
  assert (part.window, part.burn_in) == (8, 300)


@pytest.mark.parametrize("norm", [n for n in NORMS if n != "none"])
def test_declared_defaults_build_the_same_model(norm):
  """The model built with the config's declared norm_kwargs and the one built
  with none (the modules' own defaults) are the same computation: their init
  and training-mode apply trace to the same jaxpr (every argument that
  matters appears in it: a momentum as a literal, a window as a shape,
  use_scale as a parameter, unbiased_running_var as other operations;
  checked by changing one declared value at a time: 16 settings of 8 norms
  each change a jaxpr), so they give the same results bit for bit on any
  input. (Traced, not compiled: executed, the 10 cases took ~25 s.)"""
  declared = base_config().norm_kwargs[norm].to_dict()
  x = jax.ShapeDtypeStruct((32, 12), jax.numpy.float32)
  keys = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
  programs = []
  for norm_kwargs in (None, declared):
    # 12 and 20 units: GroupNorm's per-layer default groups differ (12, 20).
    model = create_model("mlp", num_classes=3, norm=norm, hidden=(12, 20),
                         norm_kwargs=norm_kwargs)
    init = functools.partial(model.init, train=False)
    apply = functools.partial(model.apply, train=True,
                              mutable=["batch_stats"])
    variables = jax.eval_shape(init, keys, x)
    programs.append((str(jax.make_jaxpr(init)(keys, x)),
                     str(jax.make_jaxpr(apply)(
                         variables, x, rngs={"noise": keys["noise"]}))))
  (init0, apply0), (init1, apply1) = programs
  assert init0 == init1
  assert apply0 == apply1


def test_model_errors_are_found_before_loading_data_naming_the_key(
    train, monkeypatch, tmp_path):
  def no_data(config):
    raise AssertionError("data loaded before the config was validated")

  monkeypatch.setattr(train.input_pipeline, "load_train_test", no_data)
  # The example: 8 groups (the config's) do not divide 4 channels.
  config = _parse(["train.py", "--config.norms=('gn',)",
                   "--config.model_kwargs.width=4"], "cifar10_resnet20.py")
  with pytest.raises(ValueError, match=r"config\.norm_kwargs\.gn\.num_groups"
                     r"=8 .*'width': 4.*must divide"):
    train.run_comparison(config, str(tmp_path))
  # A model keyword the model does not take: model_kwargs.
  config = _parse(["train.py", "--config.norms=('bn',)"], "default.py")
  config.unlock()
  config.model_kwargs.depth = 3
  with pytest.raises(ValueError, match=r"config\.model_kwargs"):
    validate_config(config)
  # A norm argument the module rejects (window >= 1), named exactly.
  config = _parse(["train.py", "--config.norms=('cbn',)",
                   "--config.norm_kwargs.cbn.window=0"])
  with pytest.raises(ValueError, match=r"config\.norm_kwargs\.cbn\.window=0"):
    validate_config(config)
  # Ghost batches must divide the batch: found by the abstract build (of a
  # training-mode forward: init alone does not normalize in ghost batches).
  config = _parse(["train.py", "--config.norms=('ghost',)",
                   "--config.batch_size=64",
                   "--config.norm_kwargs.ghost.ghost_batch_size=5"])
  with pytest.raises(ValueError,
                     match=r"config\.norm_kwargs\.ghost\.ghost_batch_size=5"):
    validate_config(config)


def test_name_lists_are_the_other_layers_own():
  from bn_jax import data, models
  assert config_validation.NORMS is models.NORMS
  assert config_validation.MODELS is models.MODELS
  assert config_validation.DATASETS[:-1] == tuple(data.DATASETS)
  assert norms_lib.NORMS is models.NORMS


def test_parts_merge_overrides_and_errors_name_the_part():
  """configs/default.py's two parts: each part's config is the top-level
  config with the part's overrides merged in (nested keys merge), command-
  line overrides reach a part, and errors name the part."""
  config = _parse(["train.py",
                   "--config.parts.small_batch.learning_rate=0.05"])
  parts = dict(config_validation.config_parts(config))
  assert list(parts) == ["bn_paper", "small_batch"]
  small, paper = parts["small_batch"], parts["bn_paper"]
  assert (small.learning_rate, paper.learning_rate) == (0.05, 0.5)
  assert (small.batch_size, paper.batch_size) == (2, 16)
  assert tuple(small.norms) == ("bn", "cbn", "naive_cbn", "gn")
  assert tuple(paper.norms) == ("none", "bn")
  # Nested: the part sets window/burn_in; the other CBN keys keep defaults.
  assert (small.norm_kwargs.cbn.window, small.norm_kwargs.cbn.burn_in) == (
      8, 300)
  assert small.norm_kwargs.cbn.momentum == paper.norm_kwargs.cbn.momentum
  assert not small.parts and not paper.parts
  config.unlock()
  config.parts.small_batch.batchsize = 3
  with pytest.raises(ValueError, match=r"config\.parts\.small_batch\."
                     r"batchsize is not a config key"):
    validate_config(config)
  config = _parse(["train.py",
                   "--config.parts.small_batch.norm_kwargs.cbn.window=0"])
  with pytest.raises(ValueError, match=r"config\.norm_kwargs\.cbn\.window=0"
                     r".*in part 'small_batch'"):
    validate_config(config)
