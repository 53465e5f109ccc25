"""Embeddings: activations at named points of the forward pass, named by the reference
checkpoint's module paths (``embedding_layer``, ``blocks.N``, ``blocks.N.mlp.l3``,
``blocks.N.filter``, ``blocks.N.inner_mha_cls``, ``norm`` …), so recipes written for the
reference Evo 2 code (e.g. the 7B's ``blocks.28.mlp.l3``) work unchanged.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sh2_jax import capture
from sh2_jax.tokenizer import encode


def _modules(model) -> dict[str, nnx.Module]:
  """Module path -> module, for every module that computes an output (not containers)."""
  return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
          if path and isinstance(node, nnx.Module) and not isinstance(node, nnx.List)}


def named_points(model) -> list[str]:
  """Every module path whose output ``embed`` can return."""
  return list(_modules(model))


def check_layer_names(model, layers: Sequence[str]) -> None:
  """Every name is a module path of ``model``; else one error listing the valid names."""
  by_name = _modules(model)
  unknown = [n for n in layers if n not in by_name]
  if unknown:
    top = sorted(n for n in by_name if not n.startswith("blocks."))
    suffixes = sorted({n.split(".", 2)[2] for n in by_name if n.count(".") >= 2})
    raise ValueError(
        f"unknown layer name(s) {unknown}; valid: {', '.join(top)}, blocks.N for N in "
        f"0..{len(model.blocks) - 1}, and blocks.N.<{'|'.join(suffixes)}> (as in the "
        "reference module paths, e.g. 'blocks.3.mlp.l3')")


def _check_produced(out: dict, layers: Sequence[str]) -> dict:
  """A named point must be a module that records its output (not a parameter container)."""
  missing = [n for n in layers if n not in out]
  if missing:
    raise ValueError(f"layer(s) {missing} produce no output in the forward pass "
                     "(e.g. a parameter container); choose a module that computes something")
  return {n: out[n] for n in layers}


def _as_tokens(tokens):
  """A string (one sequence) or a list of strings of one length -> ids [B, L]; ids pass."""
  if isinstance(tokens, (str, bytes, bytearray)):
    return encode(tokens)[None]
  if (isinstance(tokens, (list, tuple)) and tokens
      and all(isinstance(t, (str, bytes, bytearray)) for t in tokens)):
    rows = [encode(t) for t in tokens]
    if len({len(r) for r in rows}) > 1:
      raise ValueError(f"strings of different lengths {sorted({len(r) for r in rows})} do not "
                       "make one batch; use embed_sequences (batches by length, pools each "
                       "sequence over its own tokens)")
    return np.stack(rows)
  return tokens


def embed(model, tokens: jax.Array | str | Sequence[str], layers: Sequence[str], *,
          segment_len: int | None = None, mesh=None, context=None) -> dict[str, jax.Array]:
  """Activations [B, L, ...] at each named point for ``tokens`` [B, L] (ids; or a string,
  [1, L], or a list of strings of one length, [B, L], through the byte tokenizer).

  By default one jitted forward. ``segment_len``: through the segmented forward (segments of
  that many tokens carrying the recurrent state; ``mesh`` then shards its KV cache). ``mesh``
  alone: through the context-parallel forward over the mesh's ``context`` axis (``context``: a
  ``ContextParallel`` choosing the collectives; default: this mesh's axis, default modes). Every
  path records the same points, so all return the same activations.
  """
  if isinstance(layers, str):
    raise ValueError(f"layers must be a list of names, e.g. [{layers!r}]; got the string "
                     f"{layers!r}")
  layers = tuple(layers)
  tokens = _as_tokens(tokens)
  model.check_tokens(tokens if hasattr(tokens, "ndim") else np.asarray(tokens))
  if not layers:
    raise ValueError("embed needs at least one layer name, e.g. ['blocks.0.mlp.l3']")
  check_layer_names(model, layers)  # validate names before tracing
  if segment_len is not None:
    from sh2_jax.inference.segmented import segmented_activations
    acts = segmented_activations(model, np.asarray(tokens), segment_len, layers, mesh=mesh)
    return _check_produced({n: jnp.asarray(a) for n, a in acts.items()}, layers)
  if mesh is not None:
    from sh2_jax.modes import ContextParallel
    from sh2_jax.parallel.context import context_parallel_forward
    cp = context or ContextParallel(size=mesh.shape["context"])
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, tokens: context_parallel_forward(
        nnx.merge(graphdef, state), tokens, mesh, cp, layers=layers)[1])
    return _check_produced(run(state, jnp.asarray(tokens)), layers)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    _, out = capture.run(lambda m, t: m(t), nnx.merge(graphdef, state), tokens)
    return {n: out[n] for n in layers if n in out}

  return _check_produced(run(state, jnp.asarray(tokens)), layers)


def mean_pool(acts: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
  """Mean over positions: acts [B, L, D] -> [B, D]; ``lengths`` [B] ignores padding."""
  acts = acts.astype(jnp.float32)
  if lengths is None:
    return acts.mean(axis=1)
  if np.shape(lengths) != acts.shape[:1]:
    raise ValueError(f"lengths has shape {np.shape(lengths)}; expected one length per row "
                     f"({acts.shape[0]},)")
  mask = (jnp.arange(acts.shape[1])[None, :] < jnp.asarray(lengths)[:, None])[..., None]
  return (acts * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1)


POOL = ("mean", "none")


def embed_sequences(model, seqs: Iterable[bytes | str | np.ndarray], layers: str | Sequence[str],
                    *, pool: str = "mean", batch_size: int = 8, segment_len: int | None = None,
                    max_len: int | None = None, progress: bool = True):
  """Embeddings of many sequences (e.g. the records of a FASTA file), batched by length with a
  progress bar; each row equals that sequence embedded alone.

  layers: one module path -> its result; a list -> {path: result}. pool 'mean': [N, ...]
  float32, the mean over each sequence's own tokens; 'none': a list of [L_i, ...] float32
  arrays. ``segment_len``: through the segmented forward (long sequences). Sequences longer
  than ``max_len`` (default: the model's max_seqlen) are an error.
  """
  from tqdm import tqdm

  from sh2_jax.inference.generation import PROMPT_BUCKET, length_batches
  if pool not in POOL:
    raise ValueError(f"pool {pool!r} is not one of {', '.join(map(repr, POOL))}")
  names = [layers] if isinstance(layers, str) else list(layers)
  if not names:
    raise ValueError("embed_sequences needs at least one layer name, e.g. 'blocks.0.mlp.l3'")
  check_layer_names(model, names)
  seqs = [s if isinstance(s, np.ndarray) else encode(s) for s in seqs]
  empty = [i for i, s in enumerate(seqs) if len(s) == 0]
  if empty:
    raise ValueError(f"sequence {empty[0]} is empty; give at least one token per sequence")
  max_len = model.cfg.max_seqlen if max_len is None else max_len
  long = [i for i, s in enumerate(seqs) if len(s) > max_len]
  if long:
    raise ValueError(f"sequence {long[0]} has {len(seqs[long[0]])} tokens > max_len {max_len}")
  out: dict[str, list] = {n: [None] * len(seqs) for n in names}
  with tqdm(total=len(seqs), desc="embed", unit="seq", disable=not progress) as bar:
    for idx, tokens, lengths in length_batches(seqs, batch_size, PROMPT_BUCKET):
      acts = embed(model, tokens, names, segment_len=segment_len)
      for n in names:
        if pool == "mean":
          a = np.asarray(mean_pool(acts[n][:len(idx)], lengths))
        else:
          a = [np.asarray(acts[n][j, :lengths[j]], np.float32) for j in range(len(idx))]
        for j, i in enumerate(idx):
          out[n][i] = a[j]
      bar.update(len(idx))
  result = {n: np.stack(v) if pool == "mean" else v for n, v in out.items()}
  return result[layers] if isinstance(layers, str) else result
