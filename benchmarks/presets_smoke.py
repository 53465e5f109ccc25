"""Every preset of ``sh2_jax/presets.py`` compiles and runs on this device: the forward and one
AdamW training step (bf16 compute, float32 master weights), at the preset's true width, groups and
filter lengths, with fewer layers (one of each SE, MR, LI and MHA), default implementations
(``conv_impl=auto``: the Pallas kernels on a GPU). Fails loudly: exit code 1 and the failing
presets named. Run it whenever a kernel changes.

  python benchmarks/presets_smoke.py [--length 8192] [--presets evo2_1b_base,evo2_7b_base]
  python benchmarks/presets_smoke.py --conv_impl pallas_mgpu   # the Mosaic GPU FIR kernels
  python benchmarks/presets_smoke.py --li_impl modal_fast       # the token-serial LI kernels
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import device_info  # noqa: E402
from sh2_jax.config import CONV_IMPLS, LI_IMPLS  # noqa: E402
from sh2_jax.model import StripedHyena  # noqa: E402
from sh2_jax.presets import PRESETS, evo2_layer_idxs, get_preset  # noqa: E402
from sh2_jax.train.step import loss_sums  # noqa: E402

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)


def reduced(name: str, layers: int, length: int, conv_impl: str | None = None,
            li_impl: str | None = None):
  """The preset with ``layers`` layers (MHA last, SE/MR/LI before it), positions for
  ``length`` tokens, and ``conv_impl`` / ``li_impl`` when given."""
  spec = PRESETS[name]
  kw = dict(dtype="bfloat16", num_layers=layers)
  if conv_impl:
    kw["conv_impl"] = conv_impl
  if li_impl:
    kw["li_impl"] = li_impl
  if spec.get("max_seqlen", 0) < length and name != "tiny":  # tiny keeps its 256 positions
    kw["max_seqlen"] = length
  if spec.get("layer_idxs") is not None:
    kw["layer_idxs"] = evo2_layer_idxs(layers, (3,))
  return get_preset(name, **kw)


def check(name: str, length: int, layers: int, conv_impl: str | None = None,
          li_impl: str | None = None) -> dict:
  cfg = reduced(name, layers, length, conv_impl, li_impl)
  length = min(length, cfg.max_seqlen)
  model = StripedHyena(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (1, length + 1), 0, cfg.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": jnp.ones((1, length), jnp.float32)}
  opt = optax.adamw(1e-4)
  opt_state = opt.init(params)

  @jax.jit
  def forward(params, tokens):
    return nnx.merge(graphdef, params)(tokens)

  @jax.jit
  def train_step(params, opt_state, batch):
    def loss_fn(p):
      total, count = loss_sums(graphdef, p, batch, "none", None)
      return total / count
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0 = time.perf_counter()
  logits = jax.block_until_ready(forward(params, batch["inputs"]))
  t_fwd = time.perf_counter() - t0
  if not np.isfinite(np.asarray(logits[0, :4], np.float32)).all():
    raise RuntimeError("non-finite logits")
  t0 = time.perf_counter()
  params, opt_state, loss = jax.block_until_ready(train_step(params, opt_state, batch))
  t_step = time.perf_counter() - t0
  if not np.isfinite(float(loss)):
    raise RuntimeError(f"non-finite loss {float(loss)}")
  return dict(d_model=cfg.d_model, groups=cfg.mr_groups, loss=float(loss), length=length,
              fwd_s=t_fwd, step_s=t_step, conv=cfg.conv_impl, li=cfg.li_impl)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--length", type=int, default=8192)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--presets", default=",".join(n for n in PRESETS))
  p.add_argument("--conv_impl", default=None, choices=CONV_IMPLS,
                 help="override the presets' conv_impl (default: theirs, auto)")
  p.add_argument("--li_impl", default=None, choices=LI_IMPLS,
                 help="override the presets' li_impl (default: theirs, auto)")
  args = p.parse_args()
  print(device_info())
  failed = []
  print("| preset | width | groups | length | conv_impl | li_impl | forward (compile+run) s | "
        "train step (compile+run) s | loss |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.presets.split(","):
    try:
      r = check(name, args.length, args.layers, args.conv_impl, args.li_impl)
      print(f"| {name} | {r['d_model']} | {r['groups']} | {r['length']} | {r['conv']} | "
            f"{r['li']} | "
            f"{r['fwd_s']:.1f} | "
            f"{r['step_s']:.1f} | {r['loss']:.3f} |", flush=True)
    except Exception as err:  # noqa: BLE001 - report every preset, then fail
      failed.append(name)
      traceback.print_exc()
      print(f"| {name} | FAILED: {type(err).__name__}: {str(err).splitlines()[0][:150]} |",
            flush=True)
    jax.clear_caches()
  if failed:
    print(f"FAILED presets: {', '.join(failed)}")
    sys.exit(1)
  print(f"all {len(args.presets.split(','))} presets compiled and ran")


if __name__ == "__main__":
  main()
