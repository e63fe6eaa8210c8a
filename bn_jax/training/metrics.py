"""Metric records: JSON lines + TensorBoard, summaries and a results table.

Each run directory gets ``metrics.jsonl``: one JSON object per line with a
``step`` and scalar values (``train_loss``, ``train_accuracy``,
``learning_rate``, ``steps_per_sec``, ``examples_per_sec``, ``test_loss``,
``test_accuracy``, ...), and TensorBoard event files under ``tensorboard/``
written with ``tensorboardX`` (``tensorboard --logdir <workdir>``).
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Iterable, Mapping, Optional

METRICS_FILE = "metrics.jsonl"


def _to_float(value) -> float:
  return float(value)


def _import_summary_writer():
  """``tensorboardX.SummaryWriter``, or None when tensorboardX is missing.

  tensorboardX imports torch at import time (3+ seconds) only to accept torch
  tensors, which we never pass; when torch is not loaded yet, it is hidden
  for the duration of the import (``import torch`` raises ImportError, which
  tensorboardX handles) and unhidden right after.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # optional: the JSON lines are the primary record
    return None
  finally:
    if hide and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Appends scalars to ``<run_dir>/metrics.jsonl`` and TensorBoard."""

  def __init__(self, run_dir: str, *, tensorboard: bool = True):
    os.makedirs(run_dir, exist_ok=True)
    self.path = os.path.join(run_dir, METRICS_FILE)
    self._tb = None
    if tensorboard:
      SummaryWriter = _import_summary_writer()
      if SummaryWriter is not None:
        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops records beyond ``step`` (written after the checkpoint we resume
    from), so a resumed run's curves have no duplicated steps."""
    if not os.path.exists(self.path):
      return
    kept = [r for r in read_metrics(self.path) if r["step"] <= step]
    with open(self.path, "w") as f:
      for r in kept:
        f.write(json.dumps(r) + "\n")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    record = {"step": int(step)}
    record.update({k: _to_float(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      # allow_nan: a non-finite loss is recorded as NaN/Infinity (valid for
      # Python's json) before training stops.
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key != "step":
          self._tb.add_scalar(key, value, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(path: str) -> list[dict]:
  """All records of a ``metrics.jsonl`` file (a run dir is accepted too)."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(records: Iterable[Mapping], key: str) -> tuple[list, list]:
  """(steps, values) of the records that contain ``key``."""
  steps, values = [], []
  for r in records:
    if key in r:
      steps.append(r["step"])
      values.append(r[key])
  return steps, values


def last_value(records: Iterable[Mapping], key: str) -> Optional[float]:
  _, values = series(records, key)
  return values[-1] if values else None


def _fmt(value, spec: str) -> str:
  if value is None:
    return "-"
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return format(value, spec)


RESULT_COLUMNS = (
    ("norm", "norm", "s"),
    ("test_accuracy", "test acc (EMA stats)", ".4f"),
    ("precise_bn_test_accuracy", "test acc (PreciseBN)", ".4f"),
    ("test_loss", "test loss", ".4f"),
    ("train_loss", "train loss", ".4f"),
    ("steps", "steps", "d"),
    ("examples_per_sec", "train ex/s", ".0f"),
    ("train_seconds", "train s", ".1f"),
    ("status", "status", "s"),
)


def results_table(rows: Iterable[Mapping]) -> str:
  """A Markdown table, one row per run (see ``RESULT_COLUMNS``; a first
  ``part`` column when the rows come from a comparison in parts)."""
  rows = list(rows)
  columns = RESULT_COLUMNS
  if any("part" in row for row in rows):
    columns = (("part", "part", "s"),) + columns
  header = "| " + " | ".join(title for _, title, _ in columns) + " |"
  rule = "|" + "|".join("---" for _ in columns) + "|"
  lines = [header, rule]
  for row in rows:
    cells = [_fmt(row.get(key), spec) for key, _, spec in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
