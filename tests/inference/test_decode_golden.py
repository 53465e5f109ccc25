"""Decoding's numerics are pinned: tokens and logits of ``generate`` (greedy and sampled with a
fixed seed; float32 and bfloat16 compute, prompts shorter and longer than every filter) and of a
bfloat16 prefill -> segment -> decode chain equal what the implementation before the ring-buffer
caches produced (``tests/fixtures/decode_golden/outputs.npz``, written by ``golden_outputs`` at
that commit): the tokens exactly, the logits to 4 float32 ulps of the largest (the fixture's
machine and another processor's XLA CPU code differ in the last bit of 3% of the bf16 chain's
logits, by 3e-8). A change to the decoding path that moves more than that fails here;
one that means to change the numerics rewrites the fixture (``python -m
tests.inference.test_decode_golden``) and says why.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sh2_jax import ModelConfig, StripedHyena
from sh2_jax.inference import decode_step, generate, prefill
from sh2_jax.modes import KVCache, Segment
from tests.inference.conftest import perturb_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "decode_golden", "outputs.npz")
PROMPTS = ([5, 17, 3, 9, 200], list(np.arange(23) * 7 % 250), [42])  # 5, 23 (> mr_len), 1


def golden_model(dtype: str) -> StripedHyena:
  """Every layer kind; O(1) random weights (LI poles kept), deterministic."""
  cfg = ModelConfig(d_model=24, num_layers=5, layout="SE-MR-LI-MHA", num_heads=2, mlp_hidden=40,
                    se_groups=4, mr_groups=3, mr_len=20, max_seqlen=256, dtype=dtype)
  model = nnx.jit(lambda: StripedHyena(cfg, rngs=nnx.Rngs(3)))()  # one compile, not op by op
  return perturb_params(model, 3)


def _chain(model):
  """Prefill 6 tokens of two rows, a segment of 4, then 3 decode steps (one compiled program):
  the logits at the end of each."""

  @nnx.jit
  def run(model, tokens, seg):
    logits, cache = prefill(model, tokens, jnp.asarray([6, 6], jnp.int32), 24)
    seg_logits, cache = model.forward(seg, Segment(jnp.int32(6)), cache)

    def step(carry, _):
      cache, tok = carry
      logits, cache = decode_step(model, cache, tok)
      return (cache, jnp.argmax(logits, -1).astype(jnp.int32)), logits

    tok = jnp.argmax(seg_logits[:, -1], -1).astype(jnp.int32)
    _, steps = jax.lax.scan(step, (cache, tok), None, length=3)
    return jnp.concatenate([logits[None], seg_logits[None, :, -1], steps])

  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], jnp.int32)
  seg = jnp.asarray([[13, 14, 15, 16], [17, 18, 19, 20]], jnp.int32)
  return np.asarray(run(model, tokens, seg), np.float32)


def golden_outputs() -> dict[str, np.ndarray]:
  out = {}
  runs = {"float32": ("greedy", {}),
          "bfloat16": ("sampled", dict(temperature=0.8, top_k=50, seed=11))}
  for dtype, (name, kw) in runs.items():
    model = golden_model(dtype)
    toks, logits = generate(model, list(map(list, PROMPTS)), 6, return_logits=True, **kw)
    out[f"{dtype}_{name}_tokens"] = np.asarray(toks)
    out[f"{dtype}_{name}_logits"] = np.asarray(logits, np.float32)
  out["bfloat16_chain_logits"] = _chain(model)
  return out


def test_decoding_is_bitwise_unchanged():
  want = np.load(FIXTURE)
  got = golden_outputs()
  assert sorted(got) == sorted(want.files)
  for key in sorted(got):
    if key.endswith("_tokens"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    else:  # XLA's CPU code rounds a last bit differently on another processor
      ulps = 4 * np.spacing(np.max(np.abs(want[key])))
      np.testing.assert_allclose(got[key], want[key], rtol=0, atol=ulps, err_msg=key)


if __name__ == "__main__":
  os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
  np.savez_compressed(FIXTURE, **golden_outputs())
  print("wrote", FIXTURE)


def test_ring_round_trip_and_write():
  """``to_ring`` / ``from_ring`` invert each other for per-row and scalar ends; ``ring_write``
  puts position p in slot p mod K, which ``from_ring`` then reads as the window's newest."""
  from sh2_jax.modes import from_ring, ring_write, to_ring
  x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  for end in (jnp.asarray([0, 7], jnp.int32), jnp.int32(13)):
    ring = to_ring(x, end)
    np.testing.assert_array_equal(from_ring(ring, end), x)
    ends = np.broadcast_to(np.asarray(end), (2,))
    for b in range(2):  # position end-5+i at slot (end-5+i) mod 5
      for i in range(5):
        np.testing.assert_array_equal(ring[b, (ends[b] - 5 + i) % 5], x[b, i])
  pos = jnp.asarray([3, 9], jnp.int32)
  new = jnp.full((2, 3), -1.0)
  ring = ring_write(to_ring(x, pos), pos, new)
  window = from_ring(ring, pos + 1)
  np.testing.assert_array_equal(window[:, -1], new)
  np.testing.assert_array_equal(window[:, :-1], x[:, 1:])


def test_decode_loop_carries_the_caches_without_copies():
  """The compiled decoding loop updates the FIR rings and the KV caches in place, by scatters of
  unique indices: its body copies none of them (a shifted FIR window made XLA copy every history
  every step). The LI
  modal state is left out: XLA CPU keeps its einsum as a dot and recomputes the state update
  into the dot's operand, so the old state is read twice (on GPU the einsum becomes a reduce)."""
  import re
  from sh2_jax.inference.cache import init_cache
  model = golden_model("float32")
  graphdef, state = nnx.split(model)
  cache = init_cache(model.cfg, 2, 16)

  def loop(state, cache, tok):
    m = nnx.merge(graphdef, state)

    def body(_, carry):
      logits, c = decode_step(m, *carry)
      return c, jnp.argmax(logits, -1).astype(jnp.int32)

    return jax.lax.fori_loop(0, 3, body, (cache, tok))

  text = jax.jit(loop, donate_argnums=(1,)).lower(state, cache, jnp.zeros((2,), jnp.int32)
                                                   ).compile().as_text()
  leaves = [x for layer in cache.layers for x in
            (layer if isinstance(layer, KVCache) else (layer.z_hist,) + (
                (layer.state,) if layer.state.dtype == model.cfg.dtype and
                layer.state.shape[1] != model.cfg.d_model else ()))]
  shapes = {f"{jnp.dtype(x.dtype).name.replace('float', 'f')}[{','.join(map(str, x.shape))}]"
            for x in leaves}  # e.g. f32[2,20,24]
  assert len(shapes) >= 4
  copies = [line for line in text.splitlines() if re.search(r"= \S+ copy\(", line)
            and any(s in line.split("copy(")[0] for s in shapes)]
  assert not copies, copies[:3]
  # each row writes its own slot: the scatters say so (XLA GPU stores instead of looping atomics)
  scatters = [line for line in text.splitlines() if re.search(r"= \S+ scatter\(", line)]
  assert scatters and all("unique_indices=true" in line for line in scatters), scatters[:2]


def test_compute_dtype_weights_cast_only_the_matrices():
  """``generate`` decodes from ``with_compute_dtype_weights()``: Dense kernels and the embedding
  in bf16, everything used in float32 untouched, the caller's model unchanged."""
  model = golden_model("bfloat16")
  cast = model.with_compute_dtype_weights()
  before = nnx.to_flat_state(nnx.state(model, nnx.Param))
  after = dict(nnx.to_flat_state(nnx.state(cast, nnx.Param)))
  for path, var in before:
    new = after[path].get_value()
    matrix = path[-1] in ("kernel", "weight")
    assert new.dtype == (jnp.bfloat16 if matrix else jnp.float32), path
    assert var.get_value().dtype == jnp.float32, path
    np.testing.assert_array_equal(new, var.get_value().astype(new.dtype))


def test_generate_loop_donates_the_cache():
  """``generate``'s compiled loop takes the prefill's cache as its own buffers (aliased), so a
  generation holds one KV cache, not two."""
  from sh2_jax.inference import generation
  from sh2_jax.inference.cache import cache_bytes, init_cache
  model = golden_model("float32")
  graphdef, state = nnx.split(model)
  cache = init_cache(model.cfg, 2, 32)
  logits = jnp.zeros((2, model.cfg.vocab_size), jnp.float32)
  compiled = generation._decode_loop.lower(
      graphdef, state, logits, cache, jnp.full((8,), -1, jnp.int32), jax.random.key(0),
      jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0), max_new=4, greedy=True,
      return_logits=False).compile()
  assert compiled.memory_analysis().alias_size_in_bytes >= cache_bytes(model.cfg, 2, 32)
