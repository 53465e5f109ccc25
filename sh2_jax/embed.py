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


def _modules(model) -> dict[str, nnx.Module]:
  """Module path -> module, for every module that computes an output (not containers)."""
  return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
          if path and isinstance(node, nnx.Module) and not isinstance(node, nnx.List)}


def named_points(model) -> list[str]:
  """Every module path whose output ``embed`` can return."""
  return list(_modules(model))


def _check_names(model, layers: Sequence[str]) -> None:
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


def embed(model, tokens: jax.Array, layers: Sequence[str], *, segment_len: int | None = None,
          mesh=None, context=None) -> dict[str, jax.Array]:
  """Activations [B, L, ...] at each named point for ``tokens`` [B, L].

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
  model.check_tokens(tokens if hasattr(tokens, "ndim") else np.asarray(tokens))
  if not layers:
    raise ValueError("embed needs at least one layer name, e.g. ['blocks.0.mlp.l3']")
  _check_names(model, layers)  # validate names before tracing
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


def embed_sequences(model, seqs: Iterable[bytes | str], layer: str, batch_size: int = 8,
                    max_len: int | None = None, progress: bool = True) -> np.ndarray:
  """Mean-pooled embeddings [N, D] of many sequences (e.g. the records of a FASTA file),
  batched by length with a progress bar. Sequences longer than ``max_len`` are an error."""
  from tqdm import tqdm

  from sh2_jax.tokenizer import encode, pad_batch
  seqs = [encode(s) for s in seqs]
  if max_len is not None:
    long = [i for i, s in enumerate(seqs) if len(s) > max_len]
    if long:
      raise ValueError(f"sequence {long[0]} has {len(seqs[long[0]])} tokens > max_len {max_len}")
  order = np.argsort([len(s) for s in seqs])
  out = np.zeros((len(seqs), model.cfg.d_model), np.float32)
  for start in tqdm(range(0, len(seqs), batch_size), disable=not progress, desc="embed"):
    idx = order[start:start + batch_size]
    tokens, lengths = pad_batch([seqs[i] for i in idx])
    acts = embed(model, tokens, [layer])[layer]
    out[idx] = np.asarray(mean_pool(acts, lengths))
  return out
