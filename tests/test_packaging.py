"""The library installs light: ``pip install -e .`` (no extras) must give a
working ``import bn_jax; bn_jax.batch_norm(...)``, ``bn_jax.nn``,
``bn_jax.models`` and the ``bn_jax.analysis`` instruments.

Checked in a fresh interpreter in which every module of the ``train`` and
``tfds`` extras (pyproject.toml) is blocked (``sys.modules[name] = None``
makes ``import name`` raise ImportError), so an import of the training stack
sneaking into the library fails here. The output is compared with a NumPy
float64 batch normalization.
"""
import os
import pathlib
import subprocess
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Distribution name (pyproject) -> the top-level module it installs.
_MODULE_OF = {
    "ml_collections": "ml_collections", "orbax-checkpoint": "orbax",
    "tensorflow-datasets": "tensorflow_datasets", "matplotlib": "matplotlib",
    "tqdm": "tqdm", "absl-py": None,  # optax's own dependency: not blocked
    "scikit-learn": "sklearn", "tensorboardX": "tensorboardX",
    "tensorflow-cpu": "tensorflow", "tensorflow": "tensorflow",
    # A backport tensorflow-datasets imports undeclared (tfds extra); not
    # blocked: it is no part of the training stack the library must avoid.
    "importlib_resources": None,
}


def _distribution(requirement: str) -> str:
  for sep in ("<", ">", "=", "!", "~", ";", "[", " "):
    requirement = requirement.split(sep)[0]
  return requirement.strip()


def test_core_dependencies_are_jax_flax_optax_numpy():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  assert sorted(_distribution(r) for r in project["dependencies"]) == [
      "flax", "jax", "numpy", "optax"]
  extras = project["optional-dependencies"]
  # `.[test]` (the README's install) still brings the whole training stack.
  assert "bn_jax[train,tfds]" in extras["test"]


def test_library_imports_and_runs_without_the_extras():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  extras = project["optional-dependencies"]
  blocked = sorted({_MODULE_OF[_distribution(r)]
                    for r in extras["train"] + extras["tfds"]} - {None})
  assert "matplotlib" in blocked and "ml_collections" in blocked
  script = f"""
import sys
for name in {blocked!r}:
  sys.modules[name] = None  # `import name` now raises ImportError
import numpy as np
import jax, jax.numpy as jnp
import bn_jax, bn_jax.nn, bn_jax.models, bn_jax.analysis
x = np.arange(24, dtype=np.float64).reshape(6, 4) ** 1.5
state = bn_jax.batch_norm_state(4)
y, new_state = bn_jax.batch_norm(jnp.asarray(x, jnp.float32), state,
                                 train=True, epsilon=1e-5)
want = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
# float32 normalization of O(10)-sized values: error ~ a few eps_f32 * |y|
# (|y| <= 2.3); 1e-5 leaves a > 10x margin.
np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
model = bn_jax.models.create_model("mlp", num_classes=3, hidden=(4,))
v = model.init(jax.random.key(0), jnp.zeros((2, 4)), train=False)
print("ok", sorted(k for k in sys.modules if k.split(".")[0] in {blocked!r}
                   and sys.modules[k] is not None))
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "ok []"
