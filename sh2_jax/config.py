"""ModelConfig: the typed, validated description of a StripedHyena 2 model.

A model is a sequence of layer types (``SE``, ``MR``, ``LI``, ``MHA``), given either as a layout
string repeated to ``num_layers`` (``"SE-MR-LI-MHA"``) or as explicit per-type index lists (as
in the Evo 2 configs). ``ModelConfig.from_dict`` accepts an ml_collections ConfigDict or dict.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

OPS = ("SE", "MR", "LI", "MHA")
CONV_IMPLS = ("auto", "pallas", "pallas_mgpu", "xla", "fft")
LI_IMPLS = ("auto", "modal_scan", "modal_serial", "modal_fast", "fft")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# one query per row over the KV cache (decoding; the same kernels): dispatch.decode_attention_fn
DECODE_ATTENTION_IMPLS = ATTENTION_IMPLS
DTYPES = ("float32", "bfloat16", "float16")
MR_DECAYS = ("weak", "normal", "strong", "none")
FP8_MODES = ("off", "checkpoint_scales", "current_scaling")
# Context parallelism: the collective per operator (sh2_jax/parallel/).
REMAT_MODES = ("none", "blocks", "dots")  # per-block rematerialisation in the walk
CONTEXT_MR_MODES = ("p2p", "a2a")
CONTEXT_LI_MODES = ("a2a", "p2p_fft", "state")
CONTEXT_ATTENTION_MODES = ("allgather", "ring")


def resolve_layout(layout: str | None, num_layers: int,
                   layer_idxs: Mapping[str, tuple[int, ...]] | None = None) -> tuple[str, ...]:
  """Layer types from a layout string repeated to ``num_layers``, or from index lists.

  >>> resolve_layout("SE-MR-LI-MHA", 6)
  ('SE', 'MR', 'LI', 'MHA', 'SE', 'MR')
  """
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"num_layers {num_layers!r} must be a positive integer")
  if layer_idxs:
    unknown = sorted(set(layer_idxs) - set(OPS))
    if unknown:
      raise ValueError(f"layer index lists name unknown op(s) {unknown}; expected {', '.join(OPS)}")
    types: list[str | None] = [None] * num_layers
    for op, idxs in layer_idxs.items():
      for i in idxs:
        if not 0 <= i < num_layers:
          raise ValueError(f"{op} layer index {i} is outside 0..{num_layers - 1}")
        if types[i] is not None:
          raise ValueError(f"layer {i} is listed as both {types[i]} and {op}")
        types[i] = op
    missing = [i for i, t in enumerate(types) if t is None]
    if missing:
      raise ValueError(f"layers {missing} have no type in the layer index lists")
    return tuple(types)  # type: ignore[arg-type]
  if not isinstance(layout, str) or not layout.strip():
    raise ValueError(f"layout {layout!r} is empty; expected ops such as 'SE-MR-LI-MHA'")
  ops = [op.strip() for op in layout.split("-")]
  for op in ops:
    if op not in OPS:
      raise ValueError(f"layout {layout!r} has unknown op {op!r}; expected one of {', '.join(OPS)}")
  return tuple(ops[i % len(ops)] for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a StripedHyena 2 model. See docs/architecture.md for the math they
  feed."""

  d_model: int = 64
  num_layers: int = 4
  layout: str | None = "SE-MR-LI-MHA"
  layer_idxs: tuple[tuple[str, tuple[int, ...]], ...] = ()  # overrides layout when non-empty
  vocab_size: int = 512
  num_heads: int = 2
  mlp_hidden: int = 128
  se_groups: int = 8
  mr_groups: int = 8
  se_len: int = 7
  mr_len: int = 128
  featurizer_len: int = 3
  li_state: int = 16
  mr_decay: str = "weak"  # regularising decay of MR during training; 'none' for released weights
  mr_decay_length: int = 0  # t = linspace(0, 1, this)[:mr_len]; 0 means mr_len
  rope_base: float = 10000.0
  rope_scale: float = 1.0  # linear position scaling: positions / rope_scale
  eps: float = 1e-6
  evo2_style_activations: bool = True  # erf-GELU in layer 0's MLP only, identity elsewhere
  mlp_activation: str = "gelu"  # the activation when evo2_style_activations is off
  hyena_out_bias: bool = True
  mha_out_bias: bool = True
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  fp8_projections: str = "off"  # Hyena input projections: off | checkpoint_scales | current_scaling
  conv_impl: str = "auto"  # SE/MR inner filters: auto | pallas | pallas_mgpu | xla | fft
  li_impl: str = "auto"  # LI: auto | modal_scan | modal_serial | modal_fast (FFT-free Pallas) | fft
  attention_impl: str = "auto"
  decode_attention_impl: str = "auto"  # decoding's attention: auto | xla | cudnn
  max_seqlen: int = 8192

  @property
  def layer_types(self) -> tuple[str, ...]:
    return resolve_layout(self.layout, self.num_layers, dict(self.layer_idxs) or None)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def __post_init__(self):
    def bad(field, value, valid):
      raise ValueError(f"{field} {value!r} is not valid; expected {valid}")

    for field, value in (("d_model", self.d_model), ("vocab_size", self.vocab_size),
                         ("num_heads", self.num_heads), ("mlp_hidden", self.mlp_hidden),
                         ("se_len", self.se_len), ("mr_len", self.mr_len),
                         ("featurizer_len", self.featurizer_len), ("li_state", self.li_state),
                         ("se_groups", self.se_groups), ("mr_groups", self.mr_groups)):
      if not isinstance(value, int) or value < 1:
        bad(field, value, "a positive integer")
    if not isinstance(self.max_seqlen, int) or self.max_seqlen < 1:
      bad("max_seqlen", self.max_seqlen, "a positive integer")
    if not (isinstance(self.eps, (int, float)) and self.eps > 0):
      bad("eps", self.eps, "a number > 0")
    types = self.layer_types  # validates layout / index lists
    if "MHA" in types and self.d_model % self.num_heads:
      bad("num_heads", self.num_heads, f"a divisor of d_model {self.d_model}")
    for field in ("se_groups", "mr_groups"):
      groups = getattr(self, field)
      if self.d_model % groups:
        bad(field, groups, f"a divisor of d_model {self.d_model}")
    for field, value, valid in (("mr_decay", self.mr_decay, MR_DECAYS),
                                ("fp8_projections", self.fp8_projections, FP8_MODES),
                                ("conv_impl", self.conv_impl, CONV_IMPLS),
                                ("li_impl", self.li_impl, LI_IMPLS),
                                ("attention_impl", self.attention_impl, ATTENTION_IMPLS),
                                ("decode_attention_impl", self.decode_attention_impl,
                                 DECODE_ATTENTION_IMPLS),
                                ("dtype", self.dtype, DTYPES),
                                ("param_dtype", self.param_dtype, DTYPES),
                                ("mlp_activation", self.mlp_activation, ("gelu", "identity"))):
      if value not in valid:
        bad(field, value, "one of " + ", ".join(valid))
    if self.rope_scale <= 0:
      bad("rope_scale", self.rope_scale, "a positive number")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {sorted(names)}")
    if d.get("layer_idxs"):
      d["layer_idxs"] = tuple((op, tuple(int(i) for i in idxs))
                              for op, idxs in dict(d["layer_idxs"]).items())
    else:
      d["layer_idxs"] = ()
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["layer_idxs"] = {op: list(idxs) for op, idxs in self.layer_idxs}
    return d


# Fields that change no parameter's shape or dtype (numerics and implementation choices): a
# checkpoint's weights load into a model that differs from it only in these.
RUNTIME_FIELDS = ("dtype", "conv_impl", "li_impl", "attention_impl", "decode_attention_impl",
                  "max_seqlen", "mr_decay", "mr_decay_length", "rope_base", "rope_scale", "eps",
                  "fp8_projections")


def shape_diffs(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
  """``field: checkpoint X, config Y`` for every field outside ``RUNTIME_FIELDS`` in which two
  model config dicts differ (the layer order is compared as resolved layer types, so a layout
  string and the equivalent index lists agree)."""
  def norm(v):
    return json.loads(json.dumps(v))

  def types(d):
    try:
      return list(resolve_layout(d.get("layout"), d.get("num_layers"),
                                 dict(d.get("layer_idxs") or {}) or None))
    except (ValueError, TypeError):
      return None

  diffs = []
  for k in sorted(set(saved) | set(wanted)):
    if k in RUNTIME_FIELDS or k in ("layout", "layer_idxs"):
      continue
    if norm(saved.get(k)) != norm(wanted.get(k)):
      diffs.append(f"{k}: checkpoint {saved.get(k)!r}, config {wanted.get(k)!r}")
  if norm(saved.get("num_layers")) == norm(wanted.get("num_layers")) and (
      types(saved) != types(wanted)):
    diffs.append(f"layer types: checkpoint {'-'.join(types(saved) or ['?'])}, config "
                 f"{'-'.join(types(wanted) or ['?'])}")
  return diffs
