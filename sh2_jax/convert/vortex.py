"""Reference (vortex / Evo 2) checkpoints -> sh2_jax models.

``from_vortex(pt_path, yaml_path)`` reads the released ``.pt`` state dict (or its ``.partN``
shards) with the restricted reader of ``torch_pickle`` and the model's YAML config, and returns
a ``StripedHyena`` with exactly the reference numerics. Layout conversions, all in one place:
  * ``*.weight`` [out, in] -> ``kernel`` [in, out];
  * ``filter.short_filter_weight`` [3D, 1, 3] and ``filter.h`` [G, 1, K] drop the unit axis
    (orientations are kept: the modules flip SE and the featurizer themselves);
  * ``filter.log_poles`` [D, N, 1] (lambda < 0) -> ``filter.log_rates`` = log(-lambda) [D, N];
  * ``inner_mha_cls.Wqkv.weight`` rows per head [q_h; k_h; v_h] -> runtime [Q; K; V];
  * ``rotary_emb.inv_freq`` is checked against the config's RoPE base, not loaded;
  * ``*.projections._extra_state`` blobs (Transformer Engine FP8 metadata) give the FP8
    scales when the config says the model ran its projections in FP8; other blobs are skipped.
Released checkpoints hold MR filters with the training decay multiplied in: mr_decay='none'.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from sh2_jax import checks, fp8, presets
from sh2_jax.config import ModelConfig
from sh2_jax.convert.torch_pickle import BytesBlob, load_state_dict, read_extra_state
from sh2_jax.model import StripedHyena

# YAML keys whose value must be this for the conversion to be exact.
_REQUIRED = {"interleave": True, "column_split_hyena": False, "hyena_flip_x1x2": False,
             "qkv_proj_bias": False, "short_filter_bias": False, "tie_embeddings": True,
             "proj_groups": 1, "hyena_filter_groups": 1, "final_norm": True}


def config_from_yaml(cfg: Mapping[str, Any], **overrides) -> ModelConfig:
  """A vortex YAML config (as a dict) -> ModelConfig; a missing key or a value of the wrong type
  is one ValueError naming the key."""
  try:
    return _config_from_yaml(cfg, **overrides)
  except KeyError as e:
    raise ValueError(f"the vortex config has no {e.args[0]!r} key") from None
  except (TypeError, ValueError) as e:
    if "not valid" in str(e) or "unsupported" in str(e) or "not supported" in str(e):
      raise
    bad = {k: v for k, v in cfg.items() if k in _NUMERIC and not _is_number(v)}
    raise ValueError(f"vortex config values {bad or ''} must be numbers ({e})") from None


_NUMERIC = ("hidden_size", "num_layers", "vocab_size", "num_attention_heads", "inner_mlp_size",
            "hcs_filter_groups", "hcm_filter_groups", "hcs_filter_length", "hcm_filter_length",
            "short_filter_length", "state_size", "hcl_filter_groups", "max_seqlen")


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _config_from_yaml(cfg: Mapping[str, Any], **overrides) -> ModelConfig:
  bad = {k: cfg[k] for k, want in _REQUIRED.items() if k in cfg and cfg[k] != want}
  if bad:
    raise ValueError(f"unsupported vortex config values {bad}; sh2_jax converts configs with "
                     f"{ {k: _REQUIRED[k] for k in bad} }")
  d = int(cfg["hidden_size"])
  li_groups = int(cfg.get("hcl_filter_groups", d))
  if li_groups != d:
    raise ValueError(f"hcl_filter_groups {li_groups} is not supported; LI has one filter per "
                     f"channel (hcl_filter_groups = hidden_size = {d})")
  fields = dict(
      d_model=d, num_layers=int(cfg["num_layers"]), layout=None,
      layer_idxs={"SE": cfg.get("hcs_layer_idxs", []), "MR": cfg.get("hcm_layer_idxs", []),
                  "LI": cfg.get("hcl_layer_idxs", []), "MHA": cfg.get("attn_layer_idxs", [])},
      vocab_size=int(cfg["vocab_size"]), num_heads=int(cfg["num_attention_heads"]),
      mlp_hidden=int(cfg["inner_mlp_size"]), se_groups=int(cfg["hcs_filter_groups"]),
      mr_groups=int(cfg["hcm_filter_groups"]), se_len=int(cfg["hcs_filter_length"]),
      mr_len=int(cfg["hcm_filter_length"]), featurizer_len=int(cfg["short_filter_length"]),
      li_state=int(cfg["state_size"]), mr_decay="none",
      rope_base=float(cfg.get("rotary_emb_base", 10000)),
      rope_scale=float(cfg.get("rotary_emb_scaling_factor", 1.0) or 1.0),
      eps=float(cfg.get("eps", 1e-6)),
      evo2_style_activations=bool(cfg.get("evo2_style_activations", False)),
      mlp_activation="gelu" if cfg.get("mlp_activation", "gelu") == "gelu" else "identity",
      hyena_out_bias=bool(cfg.get("hyena_out_proj_bias", True)),
      mha_out_bias=bool(cfg.get("mha_out_proj_bias", True)),
      max_seqlen=int(cfg.get("max_seqlen", 8192)))
  fields.update(overrides)
  return ModelConfig.from_dict(fields)


def _expected_keys(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  d, v, f = cfg.d_model, cfg.vocab_size, cfg.mlp_hidden
  keys = {"embedding_layer.weight": (v, d), "norm.scale": (d,)}
  for i, op in enumerate(cfg.layer_types):
    p = f"blocks.{i}."
    keys.update({p + "pre_norm.scale": (d,), p + "post_norm.scale": (d,),
                 p + "mlp.l1.weight": (f, d), p + "mlp.l2.weight": (f, d),
                 p + "mlp.l3.weight": (d, f)})
    if op == "MHA":
      keys.update({p + "inner_mha_cls.Wqkv.weight": (3 * d, d),
                   p + "inner_mha_cls.out_proj.weight": (d, d),
                   p + "inner_mha_cls.rotary_emb.inv_freq": (cfg.head_dim // 2,)})
      if cfg.mha_out_bias:
        keys[p + "inner_mha_cls.out_proj.bias"] = (d,)
      continue
    keys.update({p + "projections.weight": (3 * d, d), p + "out_filter_dense.weight": (d, d),
                 p + "filter.short_filter_weight": (3 * d, 1, cfg.featurizer_len)})
    if cfg.hyena_out_bias:
      keys[p + "out_filter_dense.bias"] = (d,)
    if op == "SE":
      keys[p + "filter.h"] = (cfg.se_groups, 1, cfg.se_len)
    elif op == "MR":
      keys.update({p + "filter.h": (cfg.mr_groups, 1, cfg.mr_len), p + "filter.D": (d,)})
    else:
      keys.update({p + "filter.log_poles": (d, cfg.li_state, 1),
                   p + "filter.residues": (d, cfg.li_state), p + "filter.D": (d,)})
  return keys


def _tensor_shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in sd.items()
          if not isinstance(v, BytesBlob) and not k.endswith("._extra_state")
          and hasattr(v, "shape")}


def matching_presets_for(sd: Mapping[str, Any]) -> list[str]:
  """The presets whose parameter names and shapes are exactly those of state dict ``sd``."""
  shapes = _tensor_shapes(sd)
  return [n for n in presets.PRESETS if _expected_keys(presets.get_preset(n)) == shapes]


def _some(keys: list[str], n: int = 6) -> str:
  return ", ".join(keys[:n]) + (f", … ({len(keys) - n} more)" if len(keys) > n else "")


def check_state_dict(sd: Mapping[str, Any], cfg: ModelConfig) -> None:
  """One error (one line) listing the missing, unexpected and mis-shaped keys, and naming the
  presets whose shapes the checkpoint does have (a checkpoint paired with the wrong config)."""
  expected = _expected_keys(cfg)
  tensors = {k: v for k, v in sd.items() if not isinstance(v, BytesBlob)}
  not_arrays = sorted(f"{k} ({type(tensors[k]).__name__})" for k in set(expected) & set(tensors)
                      if not isinstance(tensors[k], np.ndarray))
  if not_arrays:
    raise ValueError(f"checkpoint entries that must be tensors are not: {', '.join(not_arrays)}")
  skipped = {k for k in sd if k not in tensors or k.endswith("._extra_state")}
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected) - skipped)
  misshaped = sorted(f"{k}: {tuple(tensors[k].shape)} (expected {expected[k]})"
                     for k in set(expected) & set(tensors)
                     if tuple(tensors[k].shape) != expected[k])
  if missing or unexpected or misshaped:
    parts = [f"{name} ({len(keys)}): {_some(keys)}" for name, keys in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
             if keys]
    matches = matching_presets_for(sd)
    hint = ""
    if matches:
      rel = presets.RELEASES
      named = [f"{n} (reference config {rel[n].reference_config})" if n in rel else n
               for n in matches]
      hint = (f"; its shapes match preset {' and '.join(named)}: pass --config "
              f"{matches[0]} (or that YAML)")
    raise ValueError("checkpoint does not match the config: " + "; ".join(parts) + hint)


def _wqkv_runtime(w: np.ndarray, heads: int) -> np.ndarray:
  """Checkpoint rows per head [q_h; k_h; v_h] -> runtime [Q; K; V], each head-major."""
  three_d, d = w.shape
  return w.reshape(heads, 3, three_d // (3 * heads), d).transpose(1, 0, 2, 3).reshape(three_d, d)


def params_from_state_dict(sd: Mapping[str, Any], cfg: ModelConfig) -> dict:
  """The nnx.Param pure dict of ``StripedHyena(cfg)`` from a reference state dict."""
  check_state_dict(sd, cfg)
  f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
  dense = lambda p, bias: ({"kernel": f32(sd[p + ".weight"]).T} |  # noqa: E731
                           ({"bias": f32(sd[p + ".bias"])} if bias else {}))
  blocks = {}
  for i, op in enumerate(cfg.layer_types):
    p = f"blocks.{i}."
    b: dict[str, Any] = {
        "pre_norm": {"scale": f32(sd[p + "pre_norm.scale"])},
        "post_norm": {"scale": f32(sd[p + "post_norm.scale"])},
        "mlp": {n: dense(p + "mlp." + n, False) for n in ("l1", "l2", "l3")}}
    if op == "MHA":
      inv_freq = f32(sd[p + "inner_mha_cls.rotary_emb.inv_freq"])
      want = 1.0 / cfg.rope_base ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
      if not np.allclose(inv_freq, want, rtol=1e-5):
        raise ValueError(f"{p}inner_mha_cls.rotary_emb.inv_freq does not match RoPE base "
                         f"{cfg.rope_base} and head dim {cfg.head_dim}")
      wqkv = _wqkv_runtime(f32(sd[p + "inner_mha_cls.Wqkv.weight"]), cfg.num_heads)
      b["inner_mha_cls"] = {"Wqkv": {"kernel": wqkv.T},
                            "out_proj": dense(p + "inner_mha_cls.out_proj", cfg.mha_out_bias)}
    else:
      filt = {"short_filter_weight": f32(sd[p + "filter.short_filter_weight"])[:, 0, :]}
      if op in ("SE", "MR"):
        filt["h"] = f32(sd[p + "filter.h"])[:, 0, :]
      else:
        lam = f32(sd[p + "filter.log_poles"])[..., 0]
        if not np.all(lam < 0):
          raise ValueError(f"{p}filter.log_poles has {int(np.sum(lam >= 0))} non-negative "
                           "poles; LI poles must be negative (decaying)")
        filt["log_rates"] = np.log(-lam)
        filt["residues"] = f32(sd[p + "filter.residues"])
      if op in ("MR", "LI"):
        filt["D"] = f32(sd[p + "filter.D"])
      b["projections"] = dense(p + "projections", False)
      if cfg.fp8_projections == "checkpoint_scales":
        b["projections"]["fp8_scales"] = _checkpoint_fp8_scales(sd, p + "projections._extra_state")
      b["filter"] = filt
      b["out_filter_dense"] = dense(p + "out_filter_dense", cfg.hyena_out_bias)
    blocks[i] = b
  return {"embedding_layer": {"weight": f32(sd["embedding_layer.weight"])},
          "blocks": blocks, "norm": {"scale": f32(sd["norm.scale"])}}


def _checkpoint_fp8_scales(sd: Mapping[str, Any], key: str) -> np.ndarray:
  state = read_extra_state(sd[key].getvalue()) if isinstance(sd.get(key), BytesBlob) else None
  if state is None:
    raise ValueError(f"fp8_projections 'checkpoint_scales' needs FP8 scales in {key}, which "
                     "the checkpoint does not hold; use fp8_projections 'current_scaling'")
  return fp8.scales_from_extra_state(state)


def fp8_mode_for(trained_fp8: bool, sd: Mapping[str, Any]) -> str:
  """The mode of a model that ran its projections in FP8 iff ``trained_fp8`` (the YAML's
  ``use_fp8_input_projections``, or the preset's): the checkpoint's scales when every Hyena
  block stores them, else current scaling (logged)."""
  if not trained_fp8:
    return "off"
  keys = [k for k in sd if k.endswith("projections._extra_state")]
  states = [read_extra_state(sd[k].getvalue()) if isinstance(sd[k], BytesBlob) else None
            for k in keys]
  if keys and all(s is not None for s in states):
    return "checkpoint_scales"
  logging.warning("checkpoint was trained with FP8 projections but holds no FP8 scales in its "
                  "_extra_state entries: using fp8_projections='current_scaling'")
  return "current_scaling"


def build_model(cfg: ModelConfig, params: dict) -> StripedHyena:
  """A StripedHyena with the given parameters, without a random initialisation pass."""
  abstract = nnx.eval_shape(lambda: StripedHyena(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(
      state, jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(cfg.param_dtype)), params))
  return nnx.merge(graphdef, state)


def read_yaml(yaml_path: str) -> dict:
  try:
    with open(yaml_path) as f:
      cfg = yaml.safe_load(f)
  except yaml.YAMLError as e:
    where = getattr(e, "problem_mark", None)
    at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
    raise ValueError(f"{yaml_path!r} is not valid YAML{at}") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{yaml_path!r} is not a YAML mapping of config keys")
  return cfg


def from_vortex(pt_path: str, config: str, dtype=jnp.float32, **overrides) -> StripedHyena:
  """Load a reference checkpoint with its config: a vortex YAML file, or the name of a preset
  (``evo2_7b_base``; the preset holds the shapes of the reference config the name is paired
  with). ``dtype`` is the compute dtype (parameters stay float32); ``overrides`` are extra
  ModelConfig fields (e.g. ``conv_impl='xla'``)."""
  if os.path.isfile(config):
    yaml_cfg = read_yaml(config)
    trained_fp8 = bool(yaml_cfg.get("use_fp8_input_projections"))
    make = functools.partial(config_from_yaml, yaml_cfg)
  elif config in presets.PRESETS or config in presets.DEPRECATED:
    name = presets.resolve_name(config)
    trained_fp8 = presets.PRESETS[name].get("fp8_projections", "off") != "off"
    make = functools.partial(presets.get_preset, name, mr_decay="none")
  else:
    raise ValueError(f"config {config!r} is neither a YAML file nor a model name; names: "
                     f"{', '.join(presets.PRESETS)}")
  shapes = make(**{**overrides, "fp8_projections": "off"})
  checks.memory(*checks.abstract_params(shapes), hint="; convert on a machine with more memory")
  sd = load_state_dict(pt_path)
  check_state_dict(sd, shapes)  # shapes first
  overrides.setdefault("fp8_projections", fp8_mode_for(trained_fp8, sd))
  cfg = make(dtype=jnp.dtype(dtype).name, **overrides)
  return build_model(cfg, params_from_state_dict(sd, cfg))
