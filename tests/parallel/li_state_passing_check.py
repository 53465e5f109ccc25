"""LI state passing on an 8-rank context mesh against the unsharded kernel (forward and the
gradients of all inputs) and against the all-to-all path (forward). Run as a script in its own
process (the forced host device count must be set before JAX starts): prints the relative
errors and exits 0 when all are <= 1e-5. ``test_modal_scan.py`` runs it."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from sh2_jax.kernels import modal_scan as ms  # noqa: E402
from sh2_jax import dispatch  # noqa: E402
from sh2_jax.parallel import a2a  # noqa: E402
from sh2_jax.parallel.li_state_passing import state_passing_gated_modal  # noqa: E402
from sh2_jax.parallel.zigzag import zigzag_shard, zigzag_unshard  # noqa: E402


def check(interpret: bool = True, devices: int = 8, seed: int = 0) -> int:
  if len(jax.devices()) < devices:
    print(f"need {devices} devices, have {len(jax.devices())}")
    return 2
  mesh = Mesh(np.array(jax.devices()[:devices]), ("context",))
  rng = np.random.default_rng(seed)
  b, d, states, c = 2, 16, 16, 11
  length = 2 * devices * c
  x1, v, x2, dy = (jnp.asarray(rng.standard_normal((b, length, d)), jnp.float32)
                   for _ in range(4))
  lam = jnp.asarray(-np.exp(rng.uniform(np.log(1e-5), np.log(8.0), (d, states))), jnp.float32)
  res = jnp.asarray(rng.standard_normal((d, states)) * 0.1, jnp.float32)
  dskip = jnp.asarray(rng.standard_normal(d), jnp.float32)
  spec = P(None, "context", None)

  def sharded(fn):
    def run(x1, v, x2, lam, res, dskip):
      zz = lambda a: zigzag_shard(a, devices)
      y = jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(), P(), P()),
                        out_specs=spec, check_vma=False)(zz(x1), zz(v), zz(x2), lam, res, dskip)
      return zigzag_unshard(y, devices)
    return run

  local = dispatch.modal_with_state_fn("modal_scan", interpret=interpret)
  sp = sharded(lambda *a: state_passing_gated_modal(*a, "context", devices, local))
  full = lambda *a: ms.gated_modal_scan(*a, interpret=interpret)
  via_a2a = sharded(lambda *a: a2a.a2a_gated_modal(*a, dispatch.modal_fn("fft"), "context",
                                                   devices))
  args = (x1, v, x2, lam, res, dskip)

  def rel(a, bb):
    a, bb = np.asarray(a, np.float64), np.asarray(bb, np.float64)
    return float(np.linalg.norm(a - bb) / np.linalg.norm(bb)) if np.isfinite(a).all() else 1.0

  y_sp, y_full, y_a2a = sp(*args), full(*args), via_a2a(*args)
  errs = {"forward": rel(y_sp, y_full), "a2a_forward": rel(y_a2a, y_full)}
  loss = lambda f: (lambda *a: jnp.sum(f(*a) * dy))
  g_sp = jax.grad(loss(sp), argnums=range(6))(*args)
  g_full = jax.grad(loss(full), argnums=range(6))(*args)
  for name, a, bb in zip(("dx1", "dv", "dx2", "dlog_poles", "dresidues", "ddskip"), g_sp,
                         g_full):
    errs[name] = rel(a, bb)
  print(" ".join(f"{k}={e:.1e}" for k, e in errs.items()))
  return 0 if all(e <= 1e-5 for e in errs.values()) else 1


if __name__ == "__main__":
  sys.exit(check())
