"""The reference PyTorch implementation (vortex, the code under the ``evo2`` package) timed on one
CUDA device: its own ``StripedHyena`` built from its own YAML config, random weights, its own
parallel forward and its own cached generation path (``initialize_inference_params`` + one call per
token, as ``vortex.model.generation.Generator`` does it).

This module imports torch and the vortex source given by ``--vortex_src`` (never JAX devices);
``benchmarks/vortex_peer.py`` runs it in a process of its own (``--side vortex``).

How vortex is configured here, and why (every deviation from the released YAML is listed in
``OVERRIDES`` and recorded in the run's ``config`` row):
- The one patch, import-only: ``vortex/ops/attn_interface.py`` imports the ``flash_attn_2_cuda``
  extension unconditionally and ``vortex.model.rotary`` imports from ``vortex.ops``, so without
  flash_attn no vortex module imports at all. When the extension is missing a stub module of that
  name goes into ``sys.modules`` (``install_flash_attn_stub``); with ``use_flash_attn: False``
  vortex never calls it, and any call would raise. No vortex file is changed, no math replaced.
- ``use_fp8_input_projections: False``: the 7B 8K YAML of the evo2 package turns FP8 on; evo2 itself
  falls back to bf16 when Transformer Engine is missing, which is what we do on purpose.
- ``use_flash_attn``: False unless ``--attn flash`` (which needs the ``flash_attn_2_cuda`` extension
  importable). With False, vortex's own fallback runs, no patch: ``SelfAttention`` (torch
  ``scaled_dot_product_attention``, causal) in the parallel forward, and ``CrossAttention`` (einsum
  scores, masked softmax, einsum) in the prefill and in each decode step over the cache.
- Weights: vortex initialises with ``torch.randn`` (std 1), which overflows the modal filters
  (``exp(log_poles * t)`` with positive log-poles). We draw normal(0, 0.02) like ours, norm scales 1,
  log-poles ``-logspace(-4, 0, 16)`` (decaying modes), residues normal(0, 0.1); then the dtype pass
  of ``vortex.model.utils.load_checkpoint``: bf16 everywhere except poles and residues (float32).
- Kernels that run (nothing is compiled from vortex's csrc; Transformer Engine, flashfftconv and
  ``hyena_ops`` are absent and vortex falls back without them): cuBLAS GEMMs for every projection
  and MLP (bf16); ATen ``conv1d`` in float32 for the 3-tap featurizer and the 7-tap SE filter;
  cuFFT in float32 for the 128-tap MR filter (``fftconv_func``, FFT size 2L) and the LI long filter
  (``parallel_iir``; the prefill's modal state by FFT, ``prefill_style: fft``); vortex's one Triton
  kernel, rotary embeddings (``vortex/ops/embedding/rotary.py``); SDPA as above (the row records
  which SDPA backends torch has enabled); decode steps are eager elementwise ops (``step_fir``,
  ``step_iir``). No ``torch.compile`` (vortex's ``compile`` key is unset), no CUDA graphs.
- Newer vortex (vtx >= 1.1) has opt-in Triton kernels for the Hyena filters, which the evo2
  package turns on with ``use_kernels=True``; the snapshot this was written against (vtx 1.0.8)
  has none. With such a source, ``--set use_hcs_kernel=true --set use_hcm_kernel=true
  --set use_hcl_kernel=true`` turns them on (the config row records every override).
- Decoding samples greedily (``argmax`` of the last logits) where ``Generator`` calls
  ``sample(top_k=1)``: the same token, a few small ops fewer per step.
- Batch 16 decoding: vortex's prefill of 16 rows at once would materialise 16 x 32 x P x P attention
  scores (CrossAttention) and 16 x 4096 x 16 x 2P complex modal states per LI layer, far past one
  card, so one row is prefilled and its cache copied into the other 15 rows (rows are independent;
  a decode step's cost does not depend on the values). The KV cache is allocated for all rows up
  front, as ``max_batch_size`` asks.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import statistics
import sys
import time
import types

# Deviations from the released YAML (always applied; ``--set`` can add more).
OVERRIDES = {"use_fp8_input_projections": False}
# A tiny shape of the same layout for --smoke on a CUDA machine (one layer of each kind).
SMOKE_SHAPE = dict(hidden_size=256, num_filters=256, num_layers=4, num_attention_heads=2,
                   inner_mlp_size=512, hcs_filter_groups=16, hcm_filter_groups=16,
                   hcl_filter_groups=256, hcs_layer_idxs=[0], hcm_layer_idxs=[1],
                   hcl_layer_idxs=[2], attn_layer_idxs=[3])
INFERENCE_KEYS = ("mha", "hcl", "hcm", "hcs")
STATE_DICTS = ("key_value_memory_dict", "fir_state_dict", "fir_inner_state_dict", "state_dict")


def have_flash_attn() -> bool:
  return importlib.util.find_spec("flash_attn_2_cuda") is not None


def install_flash_attn_stub() -> bool:
  """Stand in for ``import flash_attn_2_cuda`` when the extension is missing (see the module
  docstring); True when the stub was installed."""
  if have_flash_attn():
    return False
  stub = types.ModuleType("flash_attn_2_cuda")
  stub.__doc__ = "stub: flash_attn is not installed; only vortex's import of it is satisfied"

  def missing(name):
    if name.startswith("__"):
      raise AttributeError(name)

    def call(*args, **kwargs):
      raise RuntimeError(f"flash_attn_2_cuda.{name} called, but flash_attn is not installed "
                         "(a stub stands in for vortex's import; run with use_flash_attn False)")
    return call
  stub.__getattr__ = missing
  sys.modules["flash_attn_2_cuda"] = stub
  return True


def cuda_timeit(fn, target_s: float = 0.03, samples: int = 7, max_s: float = 6.0) -> float:
  """Median seconds per call, the method of ``benchmarks.common.timeit`` with torch's stream:
  first call excluded, ``reps`` back-to-back asynchronous calls per sample closed by
  ``torch.cuda.synchronize``, fewer samples (at least 3) for long calls."""
  import torch
  fn()
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  fn()
  torch.cuda.synchronize()
  est = max(time.perf_counter() - t0, 1e-6)
  reps = int(min(100, max(1, target_s / est)))
  samples = int(max(3, min(samples, max_s / (est * reps))))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(reps):
      fn()
    torch.cuda.synchronize()
    times.append((time.perf_counter() - t0) / reps)
  return float(statistics.median(times))


def copy_bandwidth(nbytes: int) -> float:
  """Bytes per second (read + written) of a device-to-device copy of ``nbytes``."""
  import torch
  x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
  y = torch.empty_like(x)
  t = cuda_timeit(lambda: y.copy_(x), target_s=0.05)
  moved = 2 * x.numel() * x.element_size()
  del x, y
  return moved / t


def load_config(path: str, overrides: dict):
  import yaml
  from vortex.model.utils import dotdict
  with open(path) as fh:
    cfg = yaml.safe_load(fh)
  cfg.update(overrides)
  return dotdict(cfg)


def build(config):
  """vortex's StripedHyena on cuda:0 with random weights and the dtypes of a loaded checkpoint."""
  import logging
  import torch
  from vortex.model.model import StripedHyena
  # vortex.logging sets the root logger to INFO; its per-layer lines would crowd the output
  logging.getLogger().setLevel(logging.WARNING)
  torch.manual_seed(0)
  model = StripedHyena(config)
  model.to_bfloat16_except_pr_lc(to_float32=True)  # as load_checkpoint does before loading
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("log_poles"):
        n = p.shape[1]
        rates = torch.logspace(-4, 0, n, device=p.device, dtype=torch.float32)
        p.copy_((-rates)[None, :, None].expand(p.shape))
      elif name.endswith("residues"):
        p.normal_(0.0, 0.1)
      elif name.endswith("scale"):
        p.fill_(1.0)
      else:
        p.normal_(0.0, 0.02)
  model.to_bfloat16_except_pr_lc()  # as load_checkpoint does after loading
  return model.eval()


def dtype_bytes(model) -> dict:
  out: dict = {}
  for p in model.parameters():
    key = str(p.dtype).replace("torch.", "")
    out[key] = out.get(key, 0) + p.numel() * p.element_size()
  return out


def cache_bytes(ipd) -> int:
  total = 0
  for key in INFERENCE_KEYS:
    for dname in STATE_DICTS:
      for t in (getattr(ipd[key], dname, None) or {}).values():
        total += t.numel() * t.element_size()
  return total


def copy_row_to_batch(ipd, batch: int) -> None:
  """Fill rows 1..batch-1 of every cache from row 0 (see the module docstring)."""
  for key in INFERENCE_KEYS:
    for dname in STATE_DICTS:
      d = getattr(ipd[key], dname, None) or {}
      for k, t in d.items():
        if key == "mha":  # allocated for max_batch_size rows; the prefill wrote row 0
          t[1:batch].copy_(t[:1].expand(batch - 1, *t.shape[1:]))
        else:
          assert t.shape[0] == 1, (key, dname, k, tuple(t.shape))
          d[k] = t.expand(batch, *t.shape[1:]).contiguous()


def set_offsets(ipd, value=None, step=0) -> None:
  for key in INFERENCE_KEYS:
    ipd[key].seqlen_offset = value if value is not None else ipd[key].seqlen_offset + step


def is_oom(err: BaseException) -> bool:
  return "out of memory" in str(err).lower()


def free():
  import torch
  gc.collect()
  torch.cuda.empty_cache()


def forward_point(model, length: int, vocab: int) -> dict:
  import torch
  tokens = torch.randint(0, vocab, (1, length), device="cuda")
  torch.cuda.reset_peak_memory_stats()

  def call():
    with torch.inference_mode():
      model(tokens)
  s = cuda_timeit(call)
  return dict(ms=1e3 * s, tokens_per_s=length / s,
              peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def decode_point(model, batch: int, prompt_len: int, steps: int, reps: int, vocab: int) -> dict:
  """Prefill a prompt, then ``reps`` timed loops of ``steps`` greedy decode steps (one warm-up
  loop first); ms per step is the median loop time / steps."""
  import torch
  torch.cuda.reset_peak_memory_stats()
  with torch.inference_mode():
    ipd = model.initialize_inference_params(max_seqlen=prompt_len + steps * (reps + 1) + 1)
    ipd["mha"].max_batch_size = batch
    prompt = torch.randint(0, vocab, (1, prompt_len), device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits, ipd = model(prompt, inference_params_dict=ipd)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    if batch > 1:
      copy_row_to_batch(ipd, batch)
    set_offsets(ipd, value=prompt_len)  # what Generator.generate does after its prefill call
    tok = logits[:, -1].argmax(-1).expand(batch).contiguous()
    del logits, prompt

    def loop(tok):
      for _ in range(steps):
        out, _ = model(tok[:, None], inference_params_dict=ipd)
        tok = out[:, -1].argmax(-1)
        set_offsets(ipd, step=1)
      return tok

    tok = loop(tok)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      tok = loop(tok)
      torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
    cbytes = cache_bytes(ipd)
  step_s = statistics.median(times) / steps
  return dict(ms=1e3 * step_s, tokens_per_s=batch / step_s, prefill_s=prefill_s,
              cache_bytes=cbytes, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
              step_ms_each=[round(1e3 * t / steps, 3) for t in times])


def run(args, rec, base: dict) -> None:
  """The vortex side: config row, copy bandwidth, forward points, decode points."""
  import torch
  import triton
  if not torch.cuda.is_available():
    print("skip: vortex side: torch sees no CUDA device (vortex needs one)", flush=True)
    rec.add(kind="skipped", impl="vortex", note="no CUDA device", **base)
    return
  sys.path.insert(0, os.path.abspath(args.vortex_src))
  flash_ok = have_flash_attn()
  stubbed = install_flash_attn_stub()
  overrides = dict(OVERRIDES, use_flash_attn=args.attn == "flash")
  if args.smoke:
    overrides.update(SMOKE_SHAPE)
  overrides.update(args.set)
  config = load_config(args.config, overrides)
  if args.attn == "flash" and not flash_ok:
    raise SystemExit("error: --attn flash: flash_attn_2_cuda is not importable")
  t0 = time.perf_counter()
  model = build(config)
  torch.cuda.synchronize()
  init_s = time.perf_counter() - t0
  by_dtype = dtype_bytes(model)
  param_bytes = sum(by_dtype.values())
  dev = torch.cuda.get_device_name(0)
  base = dict(base, device=dev)
  bw = copy_bandwidth(1 << 24 if args.smoke else 1 << 30)
  attention = ("flash_attn (FlashSelfAttention, flash_attn_with_kvcache)" if args.attn == "flash"
               else "torch SDPA (parallel forward); einsum + softmax CrossAttention (prefill, "
               "decode)")
  sdpa = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
          for name in ("flash", "mem_efficient", "cudnn", "math")
          if hasattr(torch.backends.cuda, f"{name}_sdp_enabled")}
  rec.add(kind="config", impl="vortex", torch=torch.__version__, triton=triton.__version__,
          sdpa_backends_enabled=sdpa, cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
          vortex_config=os.path.basename(args.config), overrides=overrides,
          flash_attn_importable=flash_ok, flash_attn_stub=stubbed,
          use_flash_attn=bool(config.use_flash_attn),
          attention=attention, param_bytes=param_bytes, param_bytes_by_dtype=by_dtype,
          prefill_style=config.get("prefill_style", "fft"), init_s=round(init_s, 1),
          copy_Bps=bw, **base)
  print(f"vortex on {dev}: torch {torch.__version__}, triton {triton.__version__}; "
        f"{config.num_layers} layers, D={config.hidden_size}; parameters {param_bytes / 2**30:.2f} "
        f"GiB {by_dtype}; attention: {attention}; copy {bw / 1e12:.2f} TB/s", flush=True)
  budget_end = time.perf_counter() + args.budget_s
  vocab = 256  # byte tokens, as in our benchmarks
  last = None  # (length, seconds of the last forward point) for the budget's prediction
  for length in args.lengths:
    row = dict(kind="forward", impl="vortex", L=length, batch=1, **base)
    predicted = 0.0 if last is None else 12 * last[1] * (length / last[0]) ** 1.3 + 10
    if time.perf_counter() + predicted > budget_end:
      rec.add(**row, ms=None, note="not run: time budget")
      continue
    t0 = time.perf_counter()
    try:
      row.update(forward_point(model, length, vocab))
      last = (length, row["ms"] / 1e3)
    except Exception as e:  # an OOM (or an op that refuses a shape) is a table note
      row.update(ms=None, note="OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:160]}")
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    free()
    rec.add(**row)
    print(f"vortex forward L={length}: {row.get('ms')} ms ({row['wall_s']} s) "
          f"{row.get('note', '')}", flush=True)
  for batch in args.batches:
    row = dict(kind="decode", impl="vortex", L=args.prompt_len, batch=batch, **base)
    if time.perf_counter() + 30 > budget_end:
      rec.add(**row, ms=None, note="not run: time budget")
      continue
    t0 = time.perf_counter()
    try:
      r = decode_point(model, batch, args.prompt_len, args.steps, args.reps, vocab)
      step_bytes = param_bytes + r["cache_bytes"]
      r.update(bytes_per_step=step_bytes, gbs=step_bytes / (r["ms"] / 1e3) / 1e9,
               pct_copy=100 * step_bytes / (r["ms"] / 1e3) / bw)
      row.update(r)
    except Exception as e:
      row.update(ms=None, note="OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:160]}")
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    free()
    rec.add(**row)
    print(f"vortex decode batch {batch}: {row.get('ms')} ms/step, step times "
          f"{row.get('step_ms_each')} ({row['wall_s']} s) {row.get('note', '')}", flush=True)
