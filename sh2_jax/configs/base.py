"""The shared ml_collections config: a model preset plus the training/eval defaults.

Every ``configs/<name>.py`` calls ``make_config(<preset>)``; override anything from the command
line with ``--config.key=value`` (e.g. ``--config.model.d_model=256``).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from sh2_jax.config import ModelConfig

from sh2_jax.presets import PRESETS, resolve_name


def make_config(preset: str) -> ml_collections.ConfigDict:
  """The training config of ``preset`` (a deprecated alias warns and maps to its new name)."""
  preset = resolve_name(preset)
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.model = ml_collections.ConfigDict(dict(PRESETS[preset]))
  # Every other ModelConfig field with its default, so that any of them can be overridden
  # from the command line (--config.model.dtype=bfloat16); ml_collections rejects new keys.
  for field in dataclasses.fields(ModelConfig):
    if field.name not in c.model and field.name != "layer_idxs":
      c.model[field.name] = field.default
  # Training (Flax-examples style top-level keys). The defaults train the tiny preset on a CPU
  # in about a minute on the shipped corpus (data.path "" = sh2_jax/data/corpus).
  c.seed = 0
  c.num_steps = 100
  c.log_every = 10
  c.checkpoint_every = 50  # and at the last step; 0: no checkpoints at all
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.eval_every = 100  # 0: never; evaluates the held-out split during training
  c.eval_batches = 8  # at most this many held-out batches per evaluation (0: all)
  c.eval_output = ""  # --mode=eval: also write the JSON summary here
  c.batch_size = 8  # global batch (all processes, all microbatches)
  c.seq_len = 128
  c.peak_flops = 0.0  # per device, for MFU; 0 = from the device kind (see train/metrics.py)
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
      eps=1e-8, grad_clip=1.0, grad_accum_steps=1, decay_embedding=True))
  c.remat = "none"  # none | blocks | dots (rematerialise each block / all but its matmuls)
  # XLA GPU's latency-hiding scheduler for the train step: auto (off on a context mesh, where it
  # kept every block's activations live: sh2_jax/train/step.py), on, off
  c.latency_hiding = "auto"
  # Fine-tuning (sh2_jax/train/finetune.py): start from this checkpoint's parameters (a
  # converted Evo 2 checkpoint, a training workdir or a step directory) with a fresh optimizer
  # at step 0; a workdir that already holds checkpoints resumes from them instead.
  c.init_from = ""
  c.freeze = ""  # parameter groups kept fixed, comma-separated: "embedding_layer,blocks.0"
  c.max_nonfinite_logs = 3  # stop after this many logged losses in a row are NaN/inf; 0: never
  c.data = ml_collections.ConfigDict(dict(
      path="", format="auto", eval_fraction=0.05, upper_case=False, n_handling="keep"))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1))
  # How each operator runs when mesh.context > 1 (sh2_jax/parallel/context.py): MR by halo
  # exchange (p2p) or all-to-all (a2a); LI by all-to-all + FFT (a2a), the point-to-point FFT
  # (p2p_fft) or modal state passing (state); attention by K/V all-gather or a ring.
  c.context_parallel = ml_collections.ConfigDict(dict(
      mr_mode="p2p", li_mode="a2a", attention_mode="allgather"))
  if preset != "tiny":
    # The published models: their pretraining context, bf16 compute over float32 master
    # weights, remat per block, and parameters sharded over every device (FSDP).
    c.seq_len = 8192
    c.model.dtype = "bfloat16"
    c.remat = "blocks"
    c.batch_size = 8
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1))
  return c
