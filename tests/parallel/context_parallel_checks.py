"""Context-parallel equality checks, run in their own process with 8 forced host devices.

``python tests/context_parallel_checks.py [names...]`` prints one JSON line per check:
{"name": ..., "rel_err": ...}: the relative error (||cp - ref|| / ||ref||, float32) of a
context-parallel computation against the unsharded one. ``test_context_parallel.py`` runs this
in a subprocess so the forced device count never leaks into other test files.
"""

from __future__ import annotations

import os
import sys

# Backend optimisation level 0: these small float32 programs are compile-bound on CPU (the
# trainer checks 128 -> 87 CPU-s with the same losses); the checks compare results, not speed
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sh2_jax import dispatch  # noqa: E402
from sh2_jax.embed import embed, named_points  # noqa: E402
from sh2_jax.config import ModelConfig  # noqa: E402
from sh2_jax.model import StripedHyena  # noqa: E402
from sh2_jax.ops import fir  # noqa: E402
from sh2_jax.parallel import a2a, halo, li_state_passing, p2p_fft  # noqa: E402
from sh2_jax.parallel.attention import cp_attention  # noqa: E402
from sh2_jax.parallel.context import ContextParallel, context_parallel_logits  # noqa: E402
from sh2_jax.parallel.zigzag import zigzag_shard, zigzag_unshard  # noqa: E402

AX = "context"
CHECK_VMA = os.environ.get("CP_CHECK_VMA", "0") == "1"  # as context_parallel_logits
B, D, CHUNK = 2, 32, 40  # chunk 40 < MR's 127-token halo: the halo spans several chunks


def mesh_of(n):
  return jax.make_mesh((n,), (AX,), devices=jax.devices()[:n], axis_types=(AxisType.Auto,))


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_cp(fn, n, params, *xs):
  """fn(params, *local shards) on zig-zag shards of the global [B, L, ...] arrays xs."""
  spec = P(None, AX)
  f = jax.shard_map(fn, mesh=mesh_of(n), in_specs=(P(),) + (spec,) * len(xs), out_specs=spec,
                    check_vma=CHECK_VMA)
  return zigzag_unshard(f(params, *[zigzag_shard(x, n) for x in xs]), n)


@functools.partial(jax.jit, static_argnums=(0,))
def _value_and_vjp(fn, params, xs, ct):
  out, vjp = jax.vjp(fn, params, xs)
  return out, vjp(ct)


def check_op(name, n, ref_fn, cp_fn, params, xs, key):
  """Forward and input/parameter gradients of cp_fn (under shard_map) against ref_fn; each side
  is one compiled function (output and VJP with a random cotangent)."""
  ct = jax.random.normal(key, jax.eval_shape(ref_fn, params, *xs).shape)
  out_ref, g_ref = _value_and_vjp(lambda p, a: ref_fn(p, *a), params, xs, ct)
  out_cp, g_cp = _value_and_vjp(lambda p, a: run_cp(cp_fn, n, p, *a), params, xs, ct)
  err_g = max(rel(a, b) for a, b in zip(jax.tree.leaves(g_cp), jax.tree.leaves(g_ref)))
  return [(f"{name}/n{n}/fwd", rel(out_cp, out_ref), ""), (f"{name}/n{n}/grad", err_g, "")]


def operator_checks(n, key):
  length = 2 * n * CHUNK
  ks = jax.random.split(key, 12)
  x1, v, x2 = (jax.random.normal(k, (B, length, D)) for k in ks[:3])
  z = jax.random.normal(ks[3], (B, length, 3 * D))
  out = []
  feat = jax.random.normal(ks[4], (3 * D, 3))
  out += check_op("featurizer", n, lambda w, z_: fir.featurizer_conv(z_, w),
                  lambda w, z_: halo.halo_featurizer(z_, w, AX, n), feat, (z,), ks[5])
  dskip = jax.random.normal(ks[6], (D,))
  for op, groups, taps, modes in (("SE", 8, 7, ("p2p",)), ("MR", 8, 128, ("p2p", "a2a"))):
    h = jax.random.normal(ks[7], (groups, taps)) / np.sqrt(taps)
    ds = None if op == "SE" else dskip
    xla = dispatch.fir_fn("xla")
    ref = lambda p, a, b_, c_, ds=ds: xla(a, b_, c_, p, ds)
    for mode in modes:
      if mode == "p2p":
        cp = lambda p, a, b_, c_, ds=ds: halo.halo_gated_fir(a, b_, c_, p, ds, xla, AX, n)
      else:
        cp = lambda p, a, b_, c_, ds=ds: a2a.a2a_gated_fir(a, b_, c_, p, ds, xla, AX, n)
      out += check_op(f"{op}-{mode}", n, ref, cp, h, (x1, v, x2), ks[8])
  poles = -jnp.exp(jax.random.uniform(ks[9], (D, 16), minval=-9, maxval=0))
  resid = jax.random.normal(ks[10], (D, 16)) * 0.1
  li_ref = lambda p, a, b_, c_: dispatch.gated_modal(a, b_, c_, p[0], p[1], dskip, "fft")
  fft = dispatch.modal_fn("fft")
  li_a2a = lambda p, a, b_, c_: a2a.a2a_gated_modal(a, b_, c_, p[0], p[1], dskip, fft, AX, n)
  li_p2p = lambda p, a, b_, c_: p2p_fft.p2p_gated_modal(a, b_, c_, p[0], p[1], dskip, AX, n)
  out += check_op("LI-a2a", n, li_ref, li_a2a, (poles, resid), (x1, v, x2), ks[11])
  out += check_op("LI-p2p_fft", n, li_ref, li_p2p, (poles, resid), (x1, v, x2), ks[11])
  li_state = lambda p, a, b_, c_: li_state_passing.state_passing_gated_modal(
      a, b_, c_, p[0], p[1], dskip, AX, n, dispatch.modal_with_state_fn("fft"))
  out += check_op("LI-state", n, li_ref, li_state, (poles, resid), (x1, v, x2), ks[11])
  heads, hd = 2, 16
  q, k, vv = (jax.random.normal(kk, (B, length, heads, hd)) for kk in jax.random.split(ks[0], 3))
  att_ref = lambda _, a, b_, c_: jax.nn.dot_product_attention(a, b_, c_, is_causal=True,
                                                              implementation="xla")
  for mode in ("allgather", "ring"):
    attend = dispatch.attention_fn("xla", jnp.float32)
    att_cp = lambda _, a, b_, c_, m=mode: cp_attention(a, b_, c_, AX, n, hd ** -0.5, attend, m)
    out += check_op(f"MHA-{mode}", n, att_ref, att_cp, jnp.zeros(()), (q, k, vv), ks[1])
  return out


def model_checks(n, key, tag="default", **cp_kw):
  cfg = ModelConfig(d_model=D, num_layers=4, layout="SE-MR-LI-MHA", num_heads=2, mlp_hidden=48,
                    se_groups=8, mr_groups=8)
  model = StripedHyena(cfg, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 1000))))
  tokens = jax.random.randint(key, (B, 2 * n * CHUNK), 0, cfg.vocab_size)
  target = jax.random.normal(jax.random.fold_in(key, 1), (B, tokens.shape[1], cfg.vocab_size))
  mesh = mesh_of(n)
  cp = ContextParallel(size=n, **cp_kw)

  @functools.partial(jax.jit, static_argnums=(1,))
  def loss_and_grad(m, cp_on):
    def loss(m_):
      logits = context_parallel_logits(m_, tokens, mesh, cp) if cp_on else m_(tokens)
      return jnp.mean(logits * target), logits
    return nnx.value_and_grad(loss, has_aux=True)(m)

  (_, logits_ref), g_ref = loss_and_grad(model, False)
  (_, logits_cp), g_cp = loss_and_grad(model, True)
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(g_ref))
  errs = {jax.tree_util.keystr(p): rel(x, flat_ref[p])
          for p, x in jax.tree_util.tree_leaves_with_path(g_cp)}
  worst = max(errs, key=errs.get)
  return [(f"model-{tag}/n{n}/logits", rel(logits_cp, logits_ref), ""),
          (f"model-{tag}/n{n}/grad", errs[worst], f"worst parameter {worst} of {len(errs)}")]


def segmented_checks(n, key, mesh=None):
  """The segmented forward with the KV cache sharded over the context axis equals the one-shot
  forward (157 tokens in segments of 13: the last partial, the cache padded to N*13)."""
  from sh2_jax.inference.segmented import segmented_apply, segmented_logits, segmented_score
  from sh2_jax.inference.scoring import score
  cfg = ModelConfig(d_model=D, num_layers=5, layout="SE-MHA-MR-LI-MHA", num_heads=2,
                    mlp_hidden=48, se_groups=8, mr_groups=8, mr_len=24)
  model = StripedHyena(cfg, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 1000))))
  tokens = np.asarray(jax.random.randint(key, (B, 157), 0, 256))
  mesh = mesh or mesh_of(n)
  ref = np.asarray(model(jnp.asarray(tokens)))
  out = segmented_logits(model, tokens, 13, mesh=mesh)
  ll = segmented_score(model, tokens, 13, mesh=mesh)
  _, cache = segmented_apply(model, tokens, 13, mesh=mesh)
  padded = -(-157 // (13 * mesh.shape[AX])) * 13 * mesh.shape[AX]
  local = cache.layers[1].k.addressable_shards[0].data.shape[1]
  tag = "x".join(f"{k}{v}" for k, v in mesh.shape.items())
  return [(f"segmented/{tag}/logits", rel(out, ref), ""),
          (f"segmented/{tag}/kv-sharded", float(local != padded // mesh.shape[AX]),
           f"KV positions per device {local} of {padded}"),
          (f"segmented/{tag}/score", rel(ll, np.asarray(score(model, jnp.asarray(tokens)))), "")]


def embed_checks(n, key):
  """``embed`` through the context-parallel forward (mesh with a 'context' axis of n ranks) and
  through the segmented forward with a sharded KV cache return the one-shot activations at every
  named point (float32)."""
  cfg = ModelConfig(d_model=D, num_layers=4, layout="SE-MR-LI-MHA", num_heads=2, mlp_hidden=48,
                    se_groups=8, mr_groups=8, mr_len=24)
  model = StripedHyena(cfg, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 1000))))
  tokens = jax.random.randint(key, (B, 2 * n * 12), 0, 256)
  names = named_points(model)
  ref = embed(model, tokens, names)
  out = []
  for tag, got in (("mesh", embed(model, tokens, names, mesh=mesh_of(n))),
                   ("segmented-mesh", embed(model, tokens, names, segment_len=20,
                                            mesh=mesh_of(n)))):
    errs = {name: rel(got[name], ref[name]) for name in names}
    worst = max(errs, key=errs.get)
    out.append((f"embed/context{n}/{tag}", errs[worst], f"worst point {worst} of {len(errs)}"))
  return out


def generation_checks(n, key):
  """generate on a context mesh (segmented prefill, sharded KV cache while decoding) picks the
  same greedy tokens with the same logits as on one device."""
  from sh2_jax.inference.generation import generate
  cfg = ModelConfig(d_model=D, num_layers=4, layout="SE-MHA-LI-MR", num_heads=2, mlp_hidden=48,
                    se_groups=8, mr_groups=8, mr_len=24)
  model = StripedHyena(cfg, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 1000))))
  prompts = np.asarray(jax.random.randint(key, (B, 45), 0, 256))
  ref_tok, ref_logits = generate(model, prompts, 9, return_logits=True)
  tok, logits = generate(model, prompts, 9, return_logits=True, mesh=mesh_of(n), segment_len=16)
  return [(f"generate/context{n}/tokens", float(np.mean(tok != ref_tok)), ""),
          (f"generate/context{n}/logits", rel(logits, ref_logits), "")]


def _generate_unequal_on_mesh():
  from sh2_jax.inference.generation import generate
  model = StripedHyena(ModelConfig(d_model=D, num_layers=1, layout="MHA", num_heads=2,
                                   mlp_hidden=48), rngs=nnx.Rngs(0))
  generate(model, [[1, 2, 3], [4, 5]], 2, mesh=mesh_of(2))


def error_checks():
  """Bad context-parallel inputs give one clear error (name, passed, message)."""
  x = jnp.ones((1, 2 * 3 * 4, 6))
  cases = {
      "error/a2a-groups-split": (
          lambda: run_cp(lambda p, a: a2a.a2a_gated_fir(a, a, a, p, None, dispatch.fir_fn("xla"), AX, 4), 4,
                         jnp.ones((6, 3)), jnp.ones((1, 32, 8))), "6 filter groups cannot be split"),
      "error/length-not-divisible": (
          lambda: zigzag_shard(jnp.ones((1, 30)), 4), "sequence length 30 cannot be zig-zag"),
      "error/p2p-fft-power-of-two": (
          lambda: run_cp(lambda p, a: p2p_fft.p2p_modal_conv(a, p, p, AX, 3), 3,
                         jnp.ones((6, 16)), x), "power-of-two context size, not 3"),
      "error/bad-mode": (lambda: ContextParallel(size=2, li_mode="fft"),
                         "context li_mode 'fft' is not one of"),
      "error/generate-mesh-unequal": (
          _generate_unequal_on_mesh, "with a mesh, prompts must have equal lengths; got "
                                     "lengths [2, 3]"),
      "error/segmented-mesh-axis": (
          _segmented_without_context, "have no 'context' axis to shard the KV cache"),
  }
  out = []
  for name, (fn, expected) in cases.items():
    try:
      fn()
      out.append((name, 1.0, "no error raised"))
    except ValueError as e:
      out.append((name, 0.0 if expected in str(e) else 1.0, str(e)[:200]))
  return out


def _segmented_without_context():
  from sh2_jax.inference.segmented import segmented_logits
  model = StripedHyena(ModelConfig(d_model=D, num_layers=1, layout="MHA", num_heads=2,
                                   mlp_hidden=48), rngs=nnx.Rngs(0))
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2], axis_types=(AxisType.Auto,))
  segmented_logits(model, np.zeros((1, 8), np.int32), 4, mesh=mesh)


def train_checks(steps: int = 3):
  """The trainer's own ``train_step`` (sh2_jax/train) on 8 devices with mesh context 4 (data 2)
  logs the same losses as unsharded, step after step (so parameter updates agree too)."""
  import ml_collections
  from sh2_jax.train import mesh as mesh_lib
  from sh2_jax.train.optim import make_optimizer
  from sh2_jax.train.step import train_step
  cfg = ModelConfig(d_model=D, num_layers=4, layout="SE-MR-LI-MHA", num_heads=2, mlp_hidden=48,
                    se_groups=8, mr_groups=8)
  model = StripedHyena(cfg, rngs=nnx.Rngs(3))
  graphdef, _ = nnx.split(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
      eps=1e-8, grad_clip=1.0, grad_accum_steps=1, decay_embedding=True)), steps)
  key = jax.random.PRNGKey(7)
  batches = []
  for i in range(steps):
    tok = jax.random.randint(jax.random.fold_in(key, i), (8, 8 * CHUNK + 1), 0, 256)
    batches.append({"inputs": tok[:, :-1], "targets": tok[:, 1:],
                    "weights": jnp.ones((8, 8 * CHUNK), jnp.float32)})
  losses = {}
  # The reference is the same train_step unsharded on one device: on this XLA CPU build the
  # 8-device data-parallel program (mesh data=8, context=1) hangs in its own collectives,
  # with or without this package, so it cannot be the reference here.
  # "4-modes": the other operator modes, as config.context_parallel passes them.
  # "4-fsdp": parameters and optimizer state placed as the trainer places them (sharded over
  # fsdp x context, mesh.FSDP_AXES), so each block gathers its own inside the CP forward
  modes = {4: None, "4-modes": dict(mr_mode="a2a", li_mode="state", attention_mode="ring"),
           "4-fsdp": None, 1: None}
  for context, context_modes in modes.items():
    mesh = (None if context == 1 else mesh_lib.make_mesh(
        ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=4))))
    step = functools.partial(train_step, graphdef=graphdef, tx=tx, remat="none", accum=1,
                             mesh=mesh, context_modes=context_modes)
    if mesh is None:
      step, p = jax.jit(step), params
      o = tx.init(p)
    else:
      # Shardings in = out, as trainer.build_step sets them, so that each configuration is one
      # compiled program (left to propagation, the second step's inputs carry the first step's
      # output shardings and the step compiles again)
      repl = mesh_lib.replicated(mesh)
      p_sh = (mesh_lib.param_shardings(mesh, params, mesh_lib.param_specs(model))
              if context == "4-fsdp" else jax.tree.map(lambda _: repl, params))
      o_sh = mesh_lib.opt_state_shardings(mesh, tx, jax.eval_shape(tx.init, params), p_sh)
      step = jax.jit(step, in_shardings=(p_sh, o_sh, mesh_lib.batch_sharding(mesh)),
                     out_shardings=(p_sh, o_sh, repl))
      p = jax.device_put(params, p_sh)
      o = jax.jit(tx.init, out_shardings=o_sh)(p)
      if context == "4-fsdp":
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(p))
    losses[context] = []
    for batch in batches:
      if mesh is not None:
        batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
      p, o, metrics = step(p, o, batch)
      losses[context].append(float(metrics["loss"]))  # blocks: one program in flight at a time
  return [(f"train/context{c}-vs-1/step{i}", abs(a - b) / abs(b),
           f"loss context {c} {a:.7f} vs unsharded {b:.7f}")
          for c in (4, "4-modes", "4-fsdp")
          for i, (a, b) in enumerate(zip(losses[c], losses[1]))]


def main(argv):
  groups = argv or ["ops", "model", "errors", "train", "segmented"]
  key = jax.random.PRNGKey(0)
  results = error_checks() if "errors" in groups else []
  if "segmented" in groups:
    results += embed_checks(4, jax.random.fold_in(key, 530))
    results += generation_checks(4, jax.random.fold_in(key, 520))
    results += segmented_checks(2, jax.random.fold_in(key, 500))
    results += segmented_checks(8, jax.random.fold_in(key, 508))
    results += segmented_checks(4, jax.random.fold_in(key, 504), mesh=jax.make_mesh(
        (2, 4), ("data", "context"), axis_types=(AxisType.Auto,) * 2))
  if "train" in groups:
    results += train_checks()
  for n in (2, 4, 8):
    if "ops" in groups:
      results += operator_checks(n, jax.random.fold_in(key, n))
    if "model" in groups:
      results += model_checks(n, jax.random.fold_in(key, 100 + n))
      if n == 4:  # the other modes and block remat, once
        results += model_checks(n, jax.random.fold_in(key, 200 + n), tag="a2a-p2pfft-ring-remat",
                                mr_mode="a2a", li_mode="p2p_fft", attention_mode="ring",
                                remat=True)
      if n == 8:
        results += model_checks(n, jax.random.fold_in(key, 300 + n), tag="state",
                                li_mode="state")
    for name, err, note in results:
      print(json.dumps({"name": name, "rel_err": err, "note": note}), flush=True)
    results = []


if __name__ == "__main__":
  main(sys.argv[1:])
