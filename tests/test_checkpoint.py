"""bn_jax.training.checkpoint: what a restore gives back (every field of the
saved state, the PRNG key included, not the target's), and restarting after
a damaged or half-written latest checkpoint (fall back to the newest one
that restores, or fail naming the directory and what to do)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax.models import create_model
from bn_jax.training import checkpoint, train_state


def _state(seed=0):
  """A small real TrainState (MLP + BN, SGD with momentum)."""
  model = create_model("mlp", num_classes=3, norm="bn", hidden=(4,))
  return train_state.create_train_state(
      jax.random.PRNGKey(seed), model, optax.sgd(0.1, momentum=0.9), (2, 5))


def _at_step(state, step, marker):
  """``state`` at ``step`` with every float leaf shifted by ``marker``, so
  the checkpoints of different steps are told apart by their values."""
  shifted = jax.tree.map(lambda a: a + marker if jnp.issubdtype(
      a.dtype, jnp.floating) else a, (state.params, state.batch_stats,
                                      state.opt_state))
  return state.replace(step=jnp.asarray(step, state.step.dtype),
                       params=shifted[0], batch_stats=shifted[1],
                       opt_state=shifted[2])


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _files(directory):
  return sorted(os.path.join(root, name)
                for root, _, names in os.walk(directory) for name in names)


def _data_files(step_dir):
  """The array-data files of an orbax checkpoint (OCDBT 'd/' chunks)."""
  files = [f for f in _files(step_dir) if os.sep + "d" + os.sep in f]
  assert files, _files(step_dir)
  return files


def _three_checkpoints(tmp_path):
  """Checkpoints at steps 1, 2, 3 (values +1, +2, +3) and the target."""
  target = _state()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  saved = {s: _at_step(target, s, float(s)) for s in (1, 2, 3)}
  for s in (1, 2, 3):
    ckpt.save(saved[s])
  assert ckpt.all_steps() == [1, 2, 3]
  return ckpt, target, saved


def test_restore_returns_the_saved_state_not_the_target():
  """Every field comes from the checkpoint: params, statistics, optimizer
  state, step and the PRNG key (the key differs from the target's, so a
  restore that kept the target's key fails here)."""
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    target = _state(seed=0)
    saved = _at_step(target, 7, 0.5).replace(
        rng=jax.random.PRNGKey(12345))
    assert not np.array_equal(np.asarray(saved.rng), np.asarray(target.rng))
    ckpt = checkpoint.Checkpointer(os.path.join(tmp, "checkpoints"))
    ckpt.save(saved)
    restored = ckpt.restore(target)
    ckpt.close()
  assert int(restored.step) == 7
  _assert_trees_equal(restored.rng, saved.rng)
  _assert_trees_equal(restored.params, saved.params)
  _assert_trees_equal(restored.batch_stats, saved.batch_stats)
  _assert_trees_equal(restored.opt_state, saved.opt_state)


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path):
  """Data files of the latest checkpoint overwritten (as a bad copy or disk
  would): the restore returns the previous step's state, warns naming the
  skipped step, and moves it aside so the run can write that step again."""
  ckpt, target, saved = _three_checkpoints(tmp_path)
  for name in _data_files(tmp_path / "checkpoints" / "3"):
    size = os.path.getsize(name)
    with open(name, "wb") as f:
      f.write(b"\x5a" * size)
  with pytest.warns(RuntimeWarning, match=r"Checkpoint step 3 in .*"
                    r"checkpoints could not be restored.*resuming from "
                    r"step 2"):
    restored = ckpt.restore(target)
  assert int(restored.step) == 2
  _assert_trees_equal(restored.params, saved[2].params)
  _assert_trees_equal(restored.opt_state, saved[2].opt_state)
  assert ckpt.all_steps() == [1, 2]
  assert (tmp_path / "checkpoints.unrestorable" / "3").is_dir()
  # The step can be written again and is then the one restored.
  ckpt.save(saved[3])
  _assert_trees_equal(ckpt.restore(target).params, saved[3].params)
  ckpt.close()


def test_half_written_latest_checkpoint_falls_back(tmp_path):
  """The latest checkpoint misses a data file (a copy or write cut short):
  the newest complete one (step 2) is restored, with a warning."""
  ckpt, target, saved = _three_checkpoints(tmp_path)
  os.remove(_data_files(tmp_path / "checkpoints" / "3")[0])
  with pytest.warns(RuntimeWarning, match="Checkpoint step 3 .*step 2"):
    restored = ckpt.restore(target)
  assert int(restored.step) == 2
  _assert_trees_equal(restored.params, saved[2].params)
  ckpt.close()


def test_no_restorable_checkpoint_names_the_directory_and_choices(tmp_path):
  ckpt, target, _ = _three_checkpoints(tmp_path)
  for step in (1, 2, 3):
    for name in _data_files(tmp_path / "checkpoints" / str(step)):
      os.remove(name)
  directory = str(tmp_path / "checkpoints")
  with pytest.raises(checkpoint.CheckpointRestoreError) as info:
    ckpt.restore(target)
  message = str(info.value)
  assert directory in message
  for step in (1, 2, 3):
    assert f"step {step}:" in message
  assert "delete that directory" in message and "fresh --workdir" in message
  # Nothing was moved: the user decides.
  assert ckpt.all_steps() == [1, 2, 3]
  ckpt.close()


def test_explicit_step_does_not_fall_back(tmp_path):
  ckpt, target, saved = _three_checkpoints(tmp_path)
  _assert_trees_equal(ckpt.restore(target, step=1).params, saved[1].params)
  os.remove(_data_files(tmp_path / "checkpoints" / "2")[0])
  with pytest.raises(Exception):
    ckpt.restore(target, step=2)
  ckpt.close()
