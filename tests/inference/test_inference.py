"""Decoding, sampling, generation and scoring.

The recurrent decode must reproduce the parallel forward for every layer type, every row of a
batch of different prompt lengths, and the reference's own greedy generation.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sh2_jax
from sh2_jax import ModelConfig, StripedHyena
from sh2_jax.ops import fir, modal
from sh2_jax.inference import (decode_step, prefill, sequence_scores, top_k_mask,
                               top_p_mask, variant_effect)
from sh2_jax.inference.cache import cache_shapes
from sh2_jax.tokenizer import PAD_ID

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures", "vortex_tiny")


def rel(a, b):
  """max |a - b| / max |b| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def randomize(model, seed=0):
  """O(1) random weights everywhere (the default init makes the blocks nearly silent, which
  would let a wrong cache hide behind the residual stream). LI poles are kept."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)

  def new(path, x):
    name = str(path[-1].key)
    shape = x.shape
    if name == "log_rates":
      return x
    if name == "residues":
      r = rng.normal(size=shape) * 0.5
    elif x.ndim == 1:
      r = rng.normal(size=shape) * 0.2 + (0.0 if name == "bias" else 1.0)
    elif name in ("short_filter_weight", "h"):
      r = rng.normal(size=shape) / np.sqrt(shape[-1])
    elif name == "weight":  # embedding [V, D]
      r = rng.normal(size=shape)
    else:  # Dense kernels [in, out]
      r = rng.normal(size=shape) / np.sqrt(shape[0])
    return jnp.asarray(r, x.dtype)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(new, pure))
  nnx.update(model, state)
  return model


def tiny(layout, num_layers=2, seed=0, **kw):
  cfg = ModelConfig(d_model=24, num_layers=num_layers, layout=layout, num_heads=2,
                    mlp_hidden=40, se_groups=4, mr_groups=3, mr_len=20, **kw)
  return randomize(StripedHyena(cfg, rngs=nnx.Rngs(seed)), seed)


forward = nnx.jit(lambda model, tokens: model(tokens))


@pytest.fixture(scope="module")
def mixed():
  return tiny("SE-MR-LI-MHA", num_layers=5, seed=1)


# ---------------------------------------------------------------- recurrent forms, float64
def test_recurrent_forms_match_float64():
  rng = np.random.default_rng(0)
  b, length, c, g, k = 2, 37, 12, 3, 5
  u = rng.normal(size=(b, length, c)).astype(np.float32)
  h = rng.normal(size=(g, k)).astype(np.float32)
  hf = np.repeat(h.astype(np.float64), c // g, axis=0)  # [C, K]
  up = np.concatenate([np.zeros((b, k - 1, c)), u.astype(np.float64)], axis=1)
  for t in (0, 3, length - 1):
    ref = sum(hf[:, j] * up[:, t + k - 1 - j] for j in range(k))
    got = fir.fir_step(jnp.asarray(up[:, t:t + k], jnp.float32), jnp.asarray(h))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
  # LI: poles from very slow to fast enough to underflow over the sequence.
  length, d, n = 1000, 4, 5
  u = rng.normal(size=(b, length, d)).astype(np.float32)
  lam = -np.array([1e-5, 1e-3, 0.05, 1.0, 80.0])[None].repeat(d, 0) * (1 + 0.1 * np.arange(d))[:, None]
  res = rng.normal(size=(d, n))
  age = (length - 1 - np.arange(length)).astype(np.float64)
  ref = np.einsum("bkd,dnk->bdn", u.astype(np.float64), np.exp(lam[..., None] * age))
  s = modal.modal_state(jnp.asarray(u), jnp.asarray(lam, jnp.float32))
  assert np.all(np.isfinite(np.asarray(s)))
  assert rel(s, ref) < 1e-5
  # One step from the state continues the modal convolution of the longer sequence.
  u_next = rng.normal(size=(b, d))
  y, s2 = modal.modal_step(s, jnp.asarray(u_next, jnp.float32), jnp.asarray(lam, jnp.float32),
                          jnp.asarray(res, jnp.float32))
  full = np.concatenate([u.astype(np.float64), u_next[:, None]], axis=1)
  filt = np.einsum("dn,dnt->dt", res, np.exp(lam[..., None] * np.arange(length + 1)))
  y_ref = np.einsum("dt,btd->bd", filt, full[:, ::-1])
  assert rel(y, y_ref) < 1e-5
  assert rel(s2, np.exp(lam) * ref + u_next[..., None]) < 1e-5


# ------------------------------------------------- decode == parallel forward, per layer type
@pytest.mark.parametrize("layout,num_layers", [("SE", 2), ("MR", 2), ("LI", 2), ("MHA", 2),
                                               ("SE-MR-LI-MHA", 5)])
def test_decode_matches_parallel_forward(layout, num_layers):
  model = tiny(layout, num_layers)
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 256, size=(2, 48)).astype(np.int32)
  # Row 0's prompt is shorter than the MR window (19), row 1's longer; both padded to 32.
  lengths = np.array([5, 27], np.int32)
  steps, max_len = 12, 48
  full = np.asarray(forward(model, jnp.asarray(tokens)))  # parallel; rows never interact
  prompts = np.where(np.arange(32) < lengths[:, None], tokens[:, :32], PAD_ID)
  logits, cache = jax.jit(lambda t, n: prefill(model, t, n, max_len))(prompts, lengths)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == jax.tree.map(
      lambda s: (s.shape, s.dtype), cache_shapes(model.cfg, 2, max_len))
  step = jax.jit(lambda c, t: decode_step(model, c, t))
  for i in range(2):
    assert rel(logits[i], full[i][lengths[i] - 1]) <= 1e-5
  for s in range(steps):
    logits, cache = step(cache, jnp.asarray(tokens[np.arange(2), lengths + s]))
    for i in range(2):
      assert rel(logits[i], full[i][lengths[i] + s]) <= 1e-5, (layout, s, i)
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + steps)


def test_generate_sizes_an_even_kv_cache():
  """64 prompt positions + 5 new tokens would be 69: the cache gets 70 (decoding's attention
  takes cuDNN only over an even length); one greedy token more than asked is never made."""
  from sh2_jax.inference.generation import _prefill_rows
  from sh2_jax.modes import KVCache
  model = tiny("SE-MR-LI-MHA", num_layers=5, seed=6)
  graphdef, state = nnx.split(model)
  _, cache = _prefill_rows(graphdef, state, [[5, 6, 7]], 5, None)
  kv = [c for c in cache.layers if isinstance(c, KVCache)]
  assert kv and {c.k.shape[1] for c in kv} == {70}
  assert sh2_jax.generate(model, [[5, 6, 7]], 5).shape == (1, 5)


def test_vortex_fixture_generation(tmp_path):
  """Evo 2 weights end to end: reference .pt -> converted checkpoint dir -> load -> generate."""
  from sh2_jax.checkpoint import save_model
  from sh2_jax.convert import from_vortex
  save_model(str(tmp_path / "converted"),
             from_vortex(os.path.join(FIX, "state_dict.pt"), os.path.join(FIX, "config.yml")))
  model = sh2_jax.load(str(tmp_path / "converted"))
  ref = np.load(os.path.join(FIX, "generation.npz"))
  tokens, logits = sh2_jax.generate(model, ref["prompt"], len(ref["generated"]),
                                    return_logits=True)
  np.testing.assert_array_equal(tokens, ref["generated"])
  # vortex's own recurrent-vs-parallel gap is 2e-5 (logits up to 22).
  assert np.max(np.abs(logits - ref["step_logits"])) < 1e-4
  assert rel(logits, ref["step_logits"]) <= 1e-5


# ------------------------------------------------------------------------------ generation
NEW = 12  # tokens per generate call: one shape for all calls below, so compilations are shared


def test_batch_of_different_lengths_equals_rows(mixed):
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, 256, size=n).astype(np.int32) for n in (3, 17, 50)]
  toks, logits = sh2_jax.generate(mixed, prompts, NEW, return_logits=True)
  assert toks.shape == (3, NEW) and logits.shape == (3, NEW, 512)
  grouped, grouped_logits = sh2_jax.generate(mixed, prompts, NEW, return_logits=True,
                                             prefill_rows=2)
  np.testing.assert_array_equal(grouped, toks)
  assert rel(grouped_logits, logits) <= 1e-6
  for i, p in enumerate(prompts):
    t1, l1 = sh2_jax.generate(mixed, p, NEW, return_logits=True)
    np.testing.assert_array_equal(toks[i], t1)
    assert rel(logits[i], l1) <= 1e-5
  # Greedy tokens are the argmax of the parallel forward over prompt + generated.
  seq = np.concatenate([prompts[1], toks[1]])
  ref = np.asarray(forward(mixed, jnp.asarray(seq[None])))[0, len(prompts[1]) - 1:-1]
  np.testing.assert_array_equal(np.argmax(ref, -1), toks[1])
  assert rel(logits[1], ref) <= 1e-5


PROMPTS = [np.arange(60, 80, dtype=np.int32), np.arange(40, 45, dtype=np.int32)]


def test_sampling_is_deterministic_per_seed(mixed):
  kw = dict(temperature=1.3, top_k=300, top_p=0.95)
  a = sh2_jax.generate(mixed, PROMPTS, NEW, seed=3, **kw)
  b = sh2_jax.generate(mixed, PROMPTS, NEW, seed=3, **kw)
  c = sh2_jax.generate(mixed, PROMPTS, NEW, seed=4, **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  greedy = sh2_jax.generate(mixed, PROMPTS, NEW)
  np.testing.assert_array_equal(sh2_jax.generate(mixed, PROMPTS, NEW, temperature=0.7, top_k=1),
                                greedy)
  np.testing.assert_array_equal(sh2_jax.generate(mixed, PROMPTS, NEW, temperature=2.0,
                                                 top_p=1e-6), greedy)


def test_top_k_top_p_masks():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 50)).astype(np.float32)
  for k in (1, 7, 50):
    out = np.asarray(top_k_mask(jnp.asarray(logits), k))
    for row, o in zip(logits, out):
      keep = set(np.argsort(row)[::-1][:k])
      assert {i for i in range(50) if np.isfinite(o[i])} == keep
      np.testing.assert_array_equal(o[list(keep)], row[list(keep)])
  np.testing.assert_array_equal(np.asarray(top_k_mask(jnp.asarray(logits), 0)), logits)
  for p in (0.01, 0.5, 0.9, 0.999):
    out = np.asarray(top_p_mask(jnp.asarray(logits), p))
    for row, o in zip(logits, out):
      order = np.argsort(row)[::-1]
      probs = np.exp(row[order] - row.max()) / np.exp(row - row.max()).sum()
      n = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest prefix with mass >= p
      assert {i for i in range(50) if np.isfinite(o[i])} == set(order[:n]), p
  np.testing.assert_array_equal(np.asarray(top_p_mask(jnp.asarray(logits), 1.0)), logits)


def test_stop_tokens(mixed):
  free = sh2_jax.generate(mixed, PROMPTS, NEW)
  i = next(j for j in range(1, NEW) if free[0, j] not in free[0, :j])
  stop = int(free[0, i])
  stopped = sh2_jax.generate(mixed, PROMPTS, NEW, stop_tokens=(stop,))
  np.testing.assert_array_equal(stopped[0, :i + 1], free[0, :i + 1])
  assert np.all(stopped[0, i + 1:] == PAD_ID)
  j = next((j for j in range(NEW) if free[1, j] == stop), NEW - 1)
  np.testing.assert_array_equal(stopped[1, :j + 1], free[1, :j + 1])
  assert np.all(stopped[1, j + 1:] == PAD_ID)


def test_generate_rejects_bad_input(mixed):
  with pytest.raises(ValueError, match="top_p 1.5"):
    sh2_jax.generate(mixed, [1, 2, 3], 4, temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match="temperature -1"):
    sh2_jax.generate(mixed, [1, 2, 3], 4, temperature=-1)
  with pytest.raises(ValueError, match="top_k 0"):
    sh2_jax.generate(mixed, [1, 2, 3], 4, top_k=0)
  with pytest.raises(ValueError, match="token id 600"):
    sh2_jax.generate(mixed, [1, 600], 4)
  with pytest.raises(ValueError, match="prompt 1 must be a non-empty"):
    sh2_jax.generate(mixed, [[1, 2], []], 4)
  with pytest.raises(ValueError, match="max_new_tokens 0"):
    sh2_jax.generate(mixed, [1, 2], 0)
  with pytest.raises(TypeError, match="tokenizer.encode"):
    sh2_jax.generate(mixed, "ACGT", 4)


# -------------------------------------------------------------------------------- scoring
def test_score_is_log_softmax_at_the_next_token(mixed):
  rng = np.random.default_rng(7)
  tokens = rng.integers(0, 256, size=(2, 33)).astype(np.int32)
  logits = np.asarray(forward(mixed, jnp.asarray(tokens)), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  ref = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  got = sh2_jax.score(mixed, tokens)
  assert got.shape == (2, 32)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  ragged = sh2_jax.score(mixed, [tokens[0, :9], tokens[1]])
  np.testing.assert_allclose(ragged[0], ref[0, :8], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ragged[1], ref[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sh2_jax.score(mixed, tokens[0]), ref[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="fewer than 2 tokens"):
    sh2_jax.score(mixed, [tokens[0], tokens[1, :1]])


def test_variant_effect(mixed):
  ref = "ACGTTGCAAGTCCGATAGCT"
  delta = variant_effect(mixed, ref, [(5, ref[5]), (5, "A"), (12, "G")])
  scores = sequence_scores(mixed, [ref, ref[:5] + "A" + ref[6:], ref[:12] + "G" + ref[13:]])
  assert delta[0] == 0.0
  np.testing.assert_allclose(delta[1:], scores[1:] - scores[0], rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="position 99"):
    variant_effect(mixed, ref, [(99, "A")])


# ------------------------------------------------------------- generate.py (zoo: tests/test_zoo.py)
def test_generate_cli(tmp_path):
  """Clean FASTA on stdout: the prompt's name and key=value metadata in the header, prompt +
  continuation in wrapped sequence lines (no separator inside them); --logprobs writes one
  TSV row per generated token."""
  fasta = tmp_path / "p.fa"
  fasta.write_text(">one first prompt\nACGTAC\nGTTA\n>two\nGGC\n")
  # JAX_PLATFORMS unset, as a user runs it: JAX then probes its backends (and used to log
  # "Unable to initialize backend 'tpu'"); the pinned jaxlib has only the CPU one.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = ROOT
  out = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", "tiny",
                        "--fasta", str(fasta), "--max_new_tokens", "5", "--temperature", "0.5",
                        "--top_k", "3", "--line_width", "8", "--logprobs",
                        str(tmp_path / "lp.tsv")],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr
  from sh2_jax.data.readers import fasta_records
  fasta_bytes = set(range(0x21, 0x7f)) - set(b">;")  # printable, no header/comment marker
  lines = out.stdout.splitlines()
  assert lines[0].startswith(">one first prompt prompt_len=10 new_tokens=5 stopped=no ")
  assert "temperature=0.5 top_k=3" in lines[0]
  assert all(len(ln) <= 8 and set(ln.encode()) <= fasta_bytes for ln in lines
             if not ln.startswith(">"))
  records = fasta_records(out.stdout.encode())
  assert [len(seq) for _, seq in records] == [15, 8]
  assert records[0][1].startswith(b"ACGTACGTTA") and records[1][1].startswith(b"GGC")
  assert records[1][0].startswith(b"two prompt_len=3 ")
  assert "RANDOM weights" in out.stderr
  noise = [ln for ln in out.stderr.splitlines() if "INFO" in ln or "tpu" in ln.lower()]
  assert not noise, noise  # no absl INFO records, no JAX backend probe
  rows = (tmp_path / "lp.tsv").read_text().splitlines()
  assert rows[0] == "record\tstep\ttoken\tlogprob" and len(rows) == 1 + 2 * 5
  assert [r.split("\t")[:2] for r in rows[1:3]] == [["one", "0"], ["one", "1"]]
  assert all(float(r.split("\t")[3]) <= 0 for r in rows[1:])