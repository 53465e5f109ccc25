"""Every convolution path against a float64 numpy direct convolution, on odd shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sh2_jax import dispatch
from sh2_jax.ops import fir, modal


def np_causal_conv(u, h):
  """float64 direct causal convolution; u: [B, L, C], h: [C, K] true-convolution."""
  u, h = np.asarray(u, np.float64), np.asarray(h, np.float64)
  b, length, c = u.shape
  y = np.zeros_like(u)
  for k in range(min(h.shape[1], length)):
    y[:, k:] += h[:, k] * u[:, : length - k]
  return y


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("b,length,d,g,k", [(2, 37, 16, 4, 7), (3, 131, 24, 24, 128),
                                             (1, 50, 12, 1, 3), (2, 90, 32, 2, 64)])
@pytest.mark.parametrize("fn", [fir.fir_conv, fir.fir_conv_shifted, fir.fft_conv])
def test_grouped_fir_paths(fn, b, length, d, g, k):
  rng = np.random.default_rng(hash((b, length, d, g, k)) % 2**32)
  u = rng.standard_normal((b, length, d)).astype(np.float32)
  h = rng.standard_normal((g, k)).astype(np.float32)
  ref = np_causal_conv(u, np.repeat(h, d // g, axis=0))
  assert rel(fn(jnp.asarray(u), jnp.asarray(h)), ref) < 1e-5


def test_modal_filter_and_li_path():
  rng = np.random.default_rng(3)
  d, n, length = 10, 16, 77
  lam = -np.exp(rng.uniform(-6, 1, (d, n))).astype(np.float32)
  res = rng.standard_normal((d, n)).astype(np.float32)
  t = np.arange(length)
  h_ref = np.einsum("dn,dnt->dt", res.astype(np.float64), np.exp(lam[..., None].astype(np.float64) * t))
  h = modal.modal_filter(jnp.asarray(lam), jnp.asarray(res), length)
  assert rel(h, h_ref) < 1e-5
  x1, v, x2 = (rng.standard_normal((2, length, d)).astype(np.float32) for _ in range(3))
  dskip = rng.standard_normal(d).astype(np.float32)
  y = dispatch.gated_modal(*map(jnp.asarray, (x1, v, x2, lam, res, dskip)), "fft")
  u = x1.astype(np.float64) * v
  ref = x2 * (np_causal_conv(u, h_ref) + dskip * u)
  assert rel(y, ref) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "fft"])
def test_gated_fir_dispatch_forward_and_grads(impl):
  rng = np.random.default_rng(7)
  b, length, d, g, k = 2, 45, 16, 4, 7
  x1, v, x2 = (jnp.asarray(rng.standard_normal((b, length, d)), jnp.float32) for _ in range(3))
  h = jnp.asarray(rng.standard_normal((g, k)), jnp.float32)
  dskip = jnp.asarray(rng.standard_normal(d), jnp.float32)
  y = dispatch.gated_fir(x1, v, x2, h, dskip, impl)
  u = np.asarray(x1, np.float64) * np.asarray(v)
  ref = np.asarray(x2) * (np_causal_conv(u, np.repeat(np.asarray(h), d // g, 0)) + np.asarray(dskip) * u)
  assert rel(y, ref) < 1e-5
  # Gradients against the float64 graph of the same math.
  f = lambda *a: jnp.sum(jnp.sin(dispatch.gated_fir(*a, impl)))  # noqa: E731
  grads = jax.grad(f, argnums=(0, 1, 2, 3, 4))(x1, v, x2, h, dskip)
  with jax.enable_x64():
    a64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x1, v, x2, h, dskip)]
    ref_grads = jax.grad(lambda *a: jnp.sum(jnp.sin(fir.gated_conv(
        a[0], a[1], a[2], lambda uu: fir.fir_conv_shifted(uu, a[3]), a[4]))),
        argnums=(0, 1, 2, 3, 4))(*a64)
  for gr, rg in zip(grads, ref_grads):
    assert rel(gr, rg) < 1e-5


def test_featurizer_and_split():
  rng = np.random.default_rng(1)
  z = rng.standard_normal((2, 19, 9)).astype(np.float32)
  w = rng.standard_normal((9, 3)).astype(np.float32)
  zc = fir.featurizer_conv(jnp.asarray(z), jnp.asarray(w))
  assert rel(zc, np_causal_conv(z, w)) < 1e-6
  x2, x1, v = fir.interleaved_split(zc)
  np.testing.assert_array_equal(np.asarray(x1), np.asarray(zc)[..., 1::3])


def test_mr_decay_presets():
  dec = fir.mr_decay(4, 128, "weak")
  assert dec.shape == (4, 128) and np.all(dec[:, 0] == 1)
  np.testing.assert_allclose(dec[-1, 64], np.exp(-100.0 * 64 / 127), rtol=1e-5)
  np.testing.assert_allclose(dec[0, 127], np.exp(-0.01), rtol=1e-6)
  assert np.all(np.diff(dec, axis=1) <= 0)
  assert np.all(fir.mr_decay(4, 7, "none") == 1)
  with pytest.raises(ValueError, match="'fast'.*normal"):
    fir.mr_decay(4, 7, "fast")


def test_bad_impls():
  x = jnp.ones((1, 4, 4))
  with pytest.raises(ValueError, match="conv_impl 'cuda'"):
    dispatch.gated_fir(x, x, x, jnp.ones((1, 3)), None, "cuda")
  with pytest.raises(ValueError, match="li_impl 'scan'"):
    dispatch.gated_modal(x, x, x, -jnp.ones((4, 2)), jnp.ones((4, 2)), None, "scan")
  with pytest.raises(ValueError, match="filter groups 3 do not divide channels 4"):
    fir.fir_conv(x, jnp.ones((3, 2)))


@pytest.mark.parametrize("shape,groups,dtype,hopper,want", [
    ((1, 8192, 4096), 256, jnp.bfloat16, True, "pallas_mgpu"),   # Evo 2 7B/40B: 16 per group
    ((1, 8192, 1920), 128, jnp.bfloat16, True, "pallas"),        # Evo 2 1B: 15 per group
    ((1, 8192, 4096), 256, jnp.float32, True, "pallas"),         # float32: Triton only
    ((1, 8192, 4096), 256, jnp.bfloat16, False, "pallas"),       # pre-Hopper
])
def test_auto_fir_choice(shape, groups, dtype, hopper, want):
  """``conv_impl='auto'`` on a GPU: Mosaic GPU on Hopper where it fits, else Triton."""
  impl, reason = dispatch.fir_choice(shape, (groups, 128), dtype, hopper=hopper)
  assert (impl, reason) == (want, None)
  assert dispatch.fir_choice(shape, (groups, 7), dtype, hopper=hopper)[0] == want


@pytest.mark.parametrize("b,length,d,dtype", [(2, 37, 5, jnp.float32), (1, 300, 4, jnp.float32),
                                              (2, 2, 3, jnp.float32), (1, 261, 6, jnp.bfloat16)])
def test_featurize_matches_autodiff(b, length, d, dtype):
  """``fir.featurize``'s hand-written backward against autodiff of the plain composition,
  fresh random inputs, odd lengths (the partial-sum rows do not divide L), L < taps."""
  kz, kw, kg = jax.random.split(jax.random.key(length), 3)
  z = jax.random.normal(kz, (b, length, 3 * d), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (3 * d, 3), jnp.float32)
  gs = [jax.random.normal(k, (b, length, d), jnp.float32) for k in jax.random.split(kg, 3)]

  def loss(f):
    return lambda z, w: sum(jnp.sum(o.astype(jnp.float32) * g) for o, g in zip(f(z, w), gs))

  plain = lambda z, w: fir.interleaved_split(fir.featurizer_conv(z, w))
  got, want = (jax.grad(loss(f), argnums=(0, 1))(z, w) for f in (fir.featurize, plain))
  under_vjp = jax.vjp(fir.featurize, z, w)[0]  # the forward rule, taps as fir.tap_vectors
  for a, e, v in zip(fir.featurize(z, w), plain(z, w), under_vjp):
    assert jnp.array_equal(a, e) and jnp.array_equal(v, e)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for a, e in zip(got, want):
    assert a.dtype == e.dtype and a.shape == e.shape
    err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - e.astype(jnp.float32)))
                / jnp.max(jnp.abs(e.astype(jnp.float32))))
    assert err <= tol, err
