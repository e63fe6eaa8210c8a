"""The README's Python examples run as written (they are the public API's
first contact; an API change that breaks them must fail CI)."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


# Slow (~30 s: the README's examples compile several modules, op by op as a
# user runs them): the public API's first contact must keep working.
def test_readme_python_examples_run(unoptimized_compilation):
  """The README's Python blocks run as written (op by op: each operation is
  compiled on its own, without XLA's optimizations, for time; what is
  checked -- shapes, finiteness, state moved -- does not depend on them)."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 2, "README lost its Python examples"
  namespace = {}
  exec(compile("\n".join(blocks), str(README), "exec"), namespace)  # noqa: S102
  # The functional example produced normalized activations and new state.
  y, state, cbn = namespace["y"], namespace["state"], namespace["cbn"]
  assert y.shape == (32, 8, 8, 32)
  assert np.all(np.isfinite(np.asarray(y)))
  assert not np.allclose(np.asarray(state.mean), 0.0)  # EMA moved
  assert int(cbn.step) == 1
