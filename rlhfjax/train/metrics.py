"""Run-directory metric writers: JSONL (one record per log step), TensorBoard events, PNG curves."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Converts scalar arrays to Python floats (non-scalars are dropped)."""
  out = {}
  for key, value in metrics.items():
    arr = np.asarray(value)
    if arr.ndim == 0:
      out[key] = float(arr)
  return out


class MetricsWriter:
  """Appends metrics to `<run_dir>/metrics.jsonl` and TensorBoard events in `<run_dir>/tb`.

  Each JSONL record is `{"step": s, "split": "train"|"eval"|..., **metrics}`. On resume, records
  with a step beyond the restored checkpoint are dropped first so the file reads as one run.
  """

  def __init__(self, run_dir: str, *, resume_step: int | None = None):
    from tensorboardX import SummaryWriter  # Lazy: TensorBoard is only needed when writing.

    os.makedirs(run_dir, exist_ok=True)
    self.path = os.path.join(run_dir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(self.path):
      kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

  def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> dict:
    record = {"step": int(step), "split": split, **to_python(metrics)}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key not in ("step", "split") and math.isfinite(value):
        self._tb.add_scalar(f"{split}/{key}", value, int(step))
    return record

  def close(self) -> None:
    self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file (`metrics.jsonl`), blank lines skipped."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_panels(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                path: str) -> str:
  """Saves a PNG with one subplot per panel, each with its named (x, y) series."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(panels)
  fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
  for ax, (title, series) in zip(axes[0], panels.items()):
    for name, (x, y) in series.items():
      ax.plot(x, y, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(series) > 1:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
