"""Training metrics: bits per byte, throughput, MFU, and their sinks (console, TensorBoard,
``metrics.jsonl``).

Bits per byte: a token is one byte (the document separator counts as one), so
bits/byte = loss (nats/token) / ln 2.
MFU = tokens/s x model FLOPs per token (``sh2_jax.flops.flops_per_token``, training = 3 x
forward) / (devices x peak FLOP/s per device). The peak comes from ``config.peak_flops`` when
set, else from the table below by device kind (dense bf16 tensor-core peak; the TF32 peak when
the model computes in float32), else a nominal 1e11 FLOP/s for a CPU device.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak FLOP/s per device: (bf16/fp16, tf32).
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # SXM; PCIe parts are lower: set config.peak_flops
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
}
CPU_NOMINAL_FLOPS = 1e11


def bits_per_byte(loss_nats: float) -> float:
  return loss_nats / math.log(2)


def peak_flops_per_device(configured: float, compute_dtype: str) -> float:
  if configured > 0:
    return float(configured)
  kind = jax.devices()[0].device_kind
  for name, (half, tf32) in PEAK_FLOPS.items():
    if name in kind:
      return half if jnp.dtype(compute_dtype).itemsize <= 2 else tf32
  return CPU_NOMINAL_FLOPS


def _step_of(line: str) -> float:
  """The step of a metrics.jsonl line; a line cut short by a killed run counts as after any."""
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return math.inf


# Metrics the TensorBoard HParams dashboard shows beside each run's config.
HPARAM_METRICS = ("train/loss", "train/bits_per_byte", "eval/loss", "eval/bits_per_byte")


def tensorboard_tag(key: str) -> str:
  """A record key -> its TensorBoard tag: ``eval_loss`` -> ``eval/loss``, ``loss`` ->
  ``train/loss`` (grouped as TensorBoard sections, as in the Flax and MaxText trainers)."""
  return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


def flat_hparams(tree: dict, prefix: str = "") -> dict:
  """A nested config dict -> ``{"optimizer.learning_rate": 3e-3, ...}`` of the scalars
  TensorBoard's HParams plugin takes (bool, int, float, str); other values as their str."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flat_hparams(value, name + "."))
    elif value is not None:
      out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
  return out


class MetricWriter:
  """One JSON object per logged step in ``workdir/metrics.jsonl`` plus TensorBoard scalars in
  ``workdir/tensorboard`` (tags ``train/...`` and ``eval/...``; ``config``, when given, is
  logged once as text and as HParams). Only the main process writes. On resume from step s,
  records after s (from the interrupted run) are dropped so the file describes one consistent
  run."""

  def __init__(self, workdir: str, enabled: bool, resume_step: int = 0, config=None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        keep = [line for line in f if _step_of(line) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(keep)
    from tensorboardX import SummaryWriter  # heavy import, main process only
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._session_end = None
    if config is not None:
      self._log_config(config.to_dict() if hasattr(config, "to_dict") else dict(config),
                       resume_step)

  def _log_config(self, config: dict, step: int) -> None:
    from tensorboardX.summary import hparams
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    self.tb.add_text("config", "```\n" + text + "\n```", step)
    experiment, session_start, self._session_end = hparams(
        flat_hparams(config), {tag: 0.0 for tag in HPARAM_METRICS})
    self.tb.file_writer.add_summary(experiment, step)
    self.tb.file_writer.add_summary(session_start, step)
    self.tb.flush()

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self.tb.add_scalar(tensorboard_tag(key), value, record["step"])
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      if self._session_end is not None:
        self.tb.file_writer.add_summary(self._session_end)
      self.tb.close()


def format_record(record: dict) -> str:
  """One console line: ``step 100 | loss 2.31 | bpb 3.33 | lr 2.9e-3 | ...``."""
  parts = []
  for key, value in record.items():
    if isinstance(value, float):
      value = f"{value:.4g}"
    parts.append(f"{key} {value}")
  return " | ".join(parts)
