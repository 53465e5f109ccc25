"""``cudnn_attention.even_lengths`` (the odd-length padding in front of cuDNN attention, whose
backward refuses odd lengths in JAX 0.11) on CPU around the XLA softmax attention: every odd /
even mix of query and key lengths, causal or not, with and without ``kv_len``, gives the
unpadded attention's output, log-sum-exp and gradients; decoding's ``auto`` takes cuDNN on a
GPU from 512 (row, head) queries over an even cache length, XLA otherwise and off GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sh2_jax import dispatch
from sh2_jax.kernels import cudnn_attention

XLA = dispatch.attention_fn("xla", jnp.float32)


@pytest.mark.parametrize("t,s,causal,with_kv_len", [(7, 7, True, False), (7, 7, False, False),
                                                    (5, 9, True, False), (6, 9, False, True),
                                                    (7, 8, True, True), (9, 5, False, False),
                                                    (8, 6, True, False)])
def test_even_lengths_is_the_unpadded_attention(t, s, causal, with_kv_len):
  b, h, d = 2, 3, 8
  rng = np.random.default_rng(t * 100 + s)
  q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for n in (t, s, s))
  kv_len = jnp.asarray([s, s - 2], jnp.int32) if with_kv_len else None
  calls = []

  def inner(q, k, v, kv_len, causal, scale, with_lse):
    calls.append((q.shape[1], k.shape[1]))
    return XLA(q, k, v, kv_len, causal, scale, with_lse)
  padded = cudnn_attention.even_lengths(inner)
  out, lse = padded(q, k, v, kv_len, causal, 0.3, True)
  assert calls[-1] == (t + t % 2, s + s % 2)  # what cuDNN would get: even lengths only
  ref_out, ref_lse = XLA(q, k, v, kv_len, causal, 0.3, True)
  assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-6)
  w = jnp.asarray(rng.standard_normal(ref_out.shape), jnp.float32)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, kv_len, causal, 0.3, False) * w)
  got = jax.grad(loss(padded), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(XLA), (0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_decode_auto_takes_cudnn_from_512_query_rows(monkeypatch):
  pick = lambda dt, rows: dispatch.resolve_decode_attention_impl("auto", dt, rows)
  assert pick(jnp.bfloat16, 4096) == "xla"  # this CPU
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
  assert pick(jnp.bfloat16, 512) == "cudnn" and pick(jnp.float16, 600) == "cudnn"
  assert pick(jnp.bfloat16, 511) == "xla" and pick(jnp.float32, 4096) == "xla"
  odd = dispatch.resolve_decode_attention_impl("auto", jnp.bfloat16, 512, 8641)
  assert odd == "xla"  # cuDNN only through a padded copy of the cache: not by default
  assert dispatch.resolve_decode_attention_impl("xla", jnp.bfloat16, 4096) == "xla"
  seen = []  # the decode step's callable decides from its traced shapes
  monkeypatch.setattr(dispatch, "_attend", lambda name: seen.append(name) or XLA)
  step = dispatch.decode_attention_fn("auto", jnp.bfloat16)
  q, k = jnp.ones((16, 1, 32, 8), jnp.bfloat16), jnp.ones((16, 5, 32, 8), jnp.bfloat16)
  out = step(q, k, k, jnp.full((16,), 3, jnp.int32), 0.3)
  step(q[:1], k[:1], k[:1], jnp.full((1,), 3, jnp.int32), 0.3)
  step(q, k[:, :4], k[:, :4], jnp.full((16,), 3, jnp.int32), 0.3)
  assert seen == ["xla", "xla", "cudnn"] and out.shape == q.shape  # odd 5, 1 row, even 4
