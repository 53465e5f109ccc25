"""The one config -> implementation dispatch for the Hyena inner filters and attention.

The only reader of ``conv_impl``, ``li_impl``, ``attention_impl`` and ``decode_attention_impl``
(their valid names are defined in ``config.py``); the modules ask it for callables (``fir_fn``,
``modal_fn``, ``modal_with_state_fn``, ``attention_fn``, ``decode_attention_fn``) and never
branch on a name themselves.

``conv_impl`` (SE, MR): ``xla`` is the direct grouped convolution of ``ops.fir.fir_conv``,
``fft`` the FFT convolution, ``pallas`` the two-stage blocked kernels of ``kernels/fir_conv.py``
(Pallas Triton lowering), ``pallas_mgpu`` the same algorithm as Mosaic GPU (Hopper) kernels,
``kernels/fir_conv_mgpu.py`` (bf16, a multiple of 16 channels per group, K <= 129); ``auto``
picks per layer: ``pallas_mgpu`` on Hopper where it fits, else ``pallas`` where the Triton
kernels fit the chip, else ``xla`` (one warning); XLA off GPU (``fir_choice`` says why).
``li_impl`` (LI): ``fft`` (the reference), ``modal_scan``, ``modal_serial`` and ``modal_fast``
(FFT-free Pallas recurrences), ``auto`` (on GPU ``modal_fast`` from ``LI_FAST_MIN_LEN``
tokens, ``modal_scan`` below; ``fft`` elsewhere).
``attention_impl``: ``xla`` | ``cudnn`` | ``auto``; ``decode_attention_impl`` (one query over
the KV cache): ``xla`` | ``cudnn`` | ``auto`` (cuDNN on GPU from 512 query rows over an even
cache length). The compute dtype float16 needs a GPU (``check_compute_dtype``).
``sh2_jax.checks.backend`` asks all of these up front, before a model is built.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from sh2_jax.config import ATTENTION_IMPLS, CONV_IMPLS, DECODE_ATTENTION_IMPLS, LI_IMPLS
from sh2_jax.kernels import cudnn_attention, modal_fast, modal_scan, modal_scan_serial
from sh2_jax.kernels import fir_conv as fir_kernels
from sh2_jax.kernels import fir_conv_mgpu
from sh2_jax.ops import fir, modal


def resolve_conv_impl(impl: str, interpret: bool = False) -> str:
  """``auto`` -> ``pallas`` on GPU (``gated_fir`` then picks per layer, ``fir_choice``), ``xla``
  elsewhere; ``pallas`` / ``pallas_mgpu`` off GPU is an error unless the caller asks for the
  Pallas interpreter (``interpret=True``, tests only: the Triton interpreter, or Mosaic GPU
  interpret mode for ``pallas_mgpu``)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl {impl!r} is not one of {', '.join(CONV_IMPLS)}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  if impl in ("pallas", "pallas_mgpu") and jax.default_backend() != "gpu" and not interpret:
    raise ValueError(f"conv_impl {impl!r} needs a GPU backend, but JAX runs on "
                     f"{jax.default_backend()!r}; use conv_impl 'auto', 'xla' or 'fft'")
  return impl


def is_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x), where the Mosaic GPU
  kernels (wgmma, TMA) run."""
  if jax.default_backend() != "gpu":
    return False
  cap = getattr(jax.devices()[0], "compute_capability", "")
  return str(cap).split(".")[0] == "9"


def fir_choice(x_shape, h_shape, dtype, hopper: bool | None = None) -> tuple[str, str | None]:
  """What ``conv_impl='auto'`` runs on a GPU for one layer, and why not a faster kernel.

  ``pallas_mgpu`` on Hopper when its kernels take the layer (H200, width 4096, B = 1, bf16,
  L = 16K, fwd / fwd+bwd: SE 0.250 / 0.738 ms against the Triton kernels' 0.338 / 1.149, MR
  0.245 / 0.947 against 0.350 / 2.397; benchmarks/RESULTS.md, "Mosaic GPU FIR"); else ``pallas`` (the
  Triton kernels: pre-Hopper GPUs, float32, group sizes not a multiple of 16 such as Evo 2 1B's
  15) when a block configuration fits the chip; else ``xla``. Returns (impl, reason for ``xla``
  or None)."""
  hopper = is_hopper() if hopper is None else hopper
  if hopper and fir_conv_mgpu.mgpu_misfit(x_shape, h_shape, dtype) is None:
    return "pallas_mgpu", None
  if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float32):
    reason = pallas_fir_misfit(x_shape, h_shape, dtype)
    return ("pallas", None) if reason is None else ("xla", reason)
  return "pallas", None


def check_compute_dtype(dtype) -> None:
  """float16 compute off GPU is an error: the model accumulates its matmuls in float32, and
  XLA's CPU dot has no float16 x float16 -> float32 ('F16_F16_F32' is not supported)."""
  if jnp.dtype(dtype) == jnp.float16 and jax.default_backend() == "cpu":
    raise ValueError("dtype 'float16' needs a GPU backend, but JAX runs on 'cpu'; use float32 "
                     "or bfloat16")


def pallas_fir_misfit(x_shape, h_shape, dtype) -> str | None:
  """Why the Pallas FIR kernels cannot run this geometry (no block configuration of the
  forward or the backward fits the device's shared memory), or None when they can."""
  try:
    fir_kernels.choose_block_sizes(x_shape, h_shape, dtype)
    fir_kernels.choose_block_sizes(x_shape, h_shape, dtype, backward=True)
  except fir_kernels.DoesNotFit as err:
    return str(err)
  return None


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
  warnings.warn(f"conv_impl 'auto': using 'xla' for this layer; {reason}", stacklevel=3)


def gated_fir(x1, v, x2, h, dskip, impl: str, interpret: bool = False):
  """``x2 * (h * (x1 * v) + dskip * x1 * v)`` for grouped FIR filters h: [G, K] (true
  convolution orientation); x1, v, x2: [B, L, D]. ``interpret`` runs the Pallas kernels in the
  interpreter (tests on CPU). A geometry the Pallas kernels cannot fit on chip runs on XLA with
  a one-line warning under ``auto``, and is an error naming why under ``pallas``."""
  requested = impl
  impl = resolve_conv_impl(impl, interpret)
  if requested == "auto" and impl == "pallas":
    impl, reason = fir_choice(x1.shape, h.shape, x1.dtype)
    if reason is not None:
      _warn_fallback(reason)
  elif impl == "pallas" and x1.dtype in (jnp.bfloat16, jnp.float32):
    reason = pallas_fir_misfit(x1.shape, h.shape, x1.dtype)
    if reason is not None:
      raise ValueError(f"conv_impl 'pallas' cannot run this layer: {reason}; use conv_impl "
                       f"'auto' (falls back to 'xla') or 'xla'")
  if impl == "pallas":
    return fir_kernels.gated_fir_conv(x1, v, x2, h, dskip, interpret=interpret)
  if impl == "pallas_mgpu":
    reason = fir_conv_mgpu.mgpu_misfit(x1.shape, h.shape, x1.dtype)
    if reason is not None:
      raise ValueError(f"conv_impl 'pallas_mgpu' cannot run this layer: {reason}; use conv_impl "
                       f"'pallas', 'auto' or 'xla'")
    return fir_conv_mgpu.gated_fir_conv_mgpu(x1, v, x2, h, dskip, interpret=interpret)
  if impl == "xla":
    return fir.gated_conv(x1, v, x2, functools.partial(fir.fir_conv, h=h), dskip)
  if impl == "fft":
    fft = functools.partial(fir.fft_conv, h=h, out_dtype=jnp.float32)
    return fir.gated_conv(x1, v, x2, fft, dskip)
  raise ValueError(f"conv_impl {impl!r} is not one of {', '.join(CONV_IMPLS)}")


LI_FAST_MIN_LEN = 65536  # ``li_impl='auto'`` on GPU: ``modal_fast`` from this many tokens


def resolve_li_impl(impl: str, interpret: bool = False, length: int | None = None) -> str:
  """``li_impl``: ``modal_scan`` (the FFT-free chunked recurrence, ``kernels/
  modal_scan.py``), ``modal_serial`` (the token-serial recurrence, ``modal_scan_serial.py``;
  on the H100 within run-to-run noise of ``modal_scan``, so not the default), ``modal_fast``
  (the token-serial recurrence with its N states as N separate vectors, two passes forward and
  two backward, ``modal_fast.py``), ``fft`` (float32 FFT of the modal filter, the reference),
  ``auto``.

  ``auto`` on GPU is ``modal_fast`` for sequences of ``length >= LI_FAST_MIN_LEN`` tokens and
  ``modal_scan`` for shorter ones (and where the length is not given). The kernels of
  ``modal_fast`` are 4.4x / 3.1x ``modal_scan``'s at 16K (H200, width 4096, B = 1, bf16; at
  128K ~5x / ~4x by the traces of whole forwards and train steps), but they compile for ~50 s
  longer per program (the tiny preset's train step: 60 s against 8 s), which short sequences
  do not win back; at 128K the whole 7-layer train step is 2801 ms against 2862 and the
  32-layer evo2_7b_base forward 3946 ms against 4032, each pair in one call
  (benchmarks/RESULTS.md, "LI's default from 64K"). ``modal_scan`` (H100: 2.7x / 3.0x faster
  than fft at 16K, 4.6x / 4.4x at 64K; RESULTS, "FFT-free LI") serves the rest. ``fft``
  elsewhere: on CPU Pallas runs only in its interpreter, and neither wins clearly (2 shared
  cores, f32, fwd / fwd+bwd: B=1 L=2048 D=64 fft 17.9 / 34.1 ms, interpreted modal_scan 13.2 /
  46.5 ms; B=1 L=8192 D=256 fft 285 / 1283 ms, modal_scan 183 / 1110 ms), so the reference
  stays. The Pallas forms off GPU are an error unless
  ``interpret=True`` (tests)."""
  if impl not in LI_IMPLS:
    raise ValueError(f"li_impl {impl!r} is not one of {', '.join(LI_IMPLS)}")
  if impl == "auto":
    if jax.default_backend() != "gpu":
      return "fft"
    return "modal_fast" if length is not None and length >= LI_FAST_MIN_LEN else "modal_scan"
  if (impl in ("modal_scan", "modal_serial", "modal_fast") and jax.default_backend() != "gpu"
      and not interpret):
    raise ValueError(f"li_impl {impl!r} needs a GPU backend, but JAX runs on "
                     f"{jax.default_backend()!r}; use li_impl 'auto' or 'fft'")
  return impl


def gated_modal(x1, v, x2, log_poles, residues, dskip, impl: str, interpret: bool = False):
  """LI: ``x2 * (h_modal * (x1 * v) + dskip * x1 * v)`` with h_modal from poles/residues [D, N];
  x1, v, x2: [B, L, D]. ``impl`` is ``li_impl`` (see ``resolve_li_impl``; ``auto`` by L)."""
  impl = resolve_li_impl(impl, interpret, x1.shape[1])
  if impl == "modal_scan":
    return modal_scan.gated_modal_scan(x1, v, x2, log_poles, residues, dskip,
                                       interpret=interpret)
  if impl == "modal_serial":
    return modal_scan_serial.modal_scan_serial(x1, v, x2, log_poles, residues, dskip,
                                               interpret=interpret)[0]
  if impl == "modal_fast":
    return modal_fast.gated_modal_fast(x1, v, x2, log_poles, residues, dskip,
                                       interpret=interpret)
  length = x1.shape[1]
  h = modal.modal_filter(log_poles, residues, length)
  fft = functools.partial(fir.fft_conv, h=h, out_dtype=jnp.float32)
  return fir.gated_conv(x1, v, x2, fft, dskip)


# -- callables for the modules: config value -> implementation, resolved here only ----------

def fir_fn(impl: str, interpret: bool = False):
  """The gated SE/MR core for ``conv_impl``: ``f(x1, v, x2, h, dskip) -> y``."""
  resolve_conv_impl(impl, interpret)  # fail early on a backend that cannot run it
  return functools.partial(gated_fir, impl=impl, interpret=interpret)


def modal_fn(impl: str, interpret: bool = False):
  """The gated LI core for ``li_impl``: ``f(x1, v, x2, log_poles, residues, dskip) -> y``."""
  resolve_li_impl(impl, interpret)
  return functools.partial(gated_modal, impl=impl, interpret=interpret)


def gated_modal_with_state(x1, v, x2, log_poles, residues, dskip=None, *, impl: str,
                           interpret: bool = False):
  """``gated_modal`` from a zero state with its final state out: (y, state [B, D, N] float32).
  ``impl`` is ``li_impl`` (``auto`` by L, as in ``gated_modal``)."""
  impl = resolve_li_impl(impl, interpret, x1.shape[1])
  if impl == "modal_scan":
    return modal_scan.modal_scan(x1, v, x2, log_poles, residues, dskip, interpret=interpret)
  if impl == "modal_serial":
    return modal_scan_serial.modal_scan_serial(x1, v, x2, log_poles, residues, dskip,
                                               interpret=interpret)
  if impl == "modal_fast":
    return modal_fast.modal_fast(x1, v, x2, log_poles, residues, dskip, interpret=interpret)
  y = gated_modal(x1, v, x2, log_poles, residues, dskip, "fft")
  return y, modal.modal_state(x1 * v, log_poles)


def modal_with_state_fn(impl: str, interpret: bool = False):
  """The gated LI core from a zero state with its final state out, for ``li_impl``:
  ``f(x1, v, x2, log_poles, residues, dskip) -> (y, state [B, D, N] float32)``."""
  resolve_li_impl(impl, interpret)
  return functools.partial(gated_modal_with_state, impl=impl, interpret=interpret)


def resolve_attention_impl(impl: str, dtype) -> str:
  """``attention_impl`` -> ``xla`` | ``cudnn``: ``auto`` is cuDNN on GPU for bf16/fp16, XLA
  elsewhere; ``cudnn`` elsewhere is an error."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
  if impl == "auto":
    return "cudnn" if _cudnn_usable(dtype) else "xla"
  if impl == "cudnn":
    _check_cudnn("attention_impl", dtype)
  return impl


def _cudnn_usable(dtype) -> bool:
  return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def _check_cudnn(field: str, dtype) -> None:
  if jax.default_backend() != "gpu":
    raise ValueError(f"{field} 'cudnn' needs a GPU backend, not {jax.default_backend()!r}")
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"{field} 'cudnn' needs dtype bfloat16 or float16, not {dtype}")


@functools.cache
def _attend(impl: str):
  """The softmax of ``ops.attention``: ``attend(q, k, v, kv_len, causal, scale, with_lse)``.
  One function object per implementation, so it can be a static (nondiff) argument; cuDNN
  through ``cudnn_attention.even_lengths`` (its backward refuses odd lengths)."""
  def attend(q, k, v, kv_len, causal, scale, with_lse):
    if impl == "cudnn" and with_lse:
      return cudnn_attention.attention_with_lse(q, k, v, kv_len, causal, scale)
    res = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=kv_len,
        implementation=impl, return_residual=with_lse)
    if with_lse:
      return res[0], res[1].astype(jnp.float32)
    return res
  return cudnn_attention.even_lengths(attend) if impl == "cudnn" else attend


def attention_fn(impl: str, dtype):
  """The softmax attention for ``attention_impl`` at compute ``dtype`` (see ``_attend``)."""
  return _attend(resolve_attention_impl(impl, dtype))


# batch x heads from which cuDNN's attention kernel decodes faster than XLA's (one H200,
# evo2_7b at 8K: 512 rows (batch 16) 7.30 against 8.42 ms per token; 32 rows (batch 1) 4.79
# against 4.41): below it the kernel has too few (row, head) programs to fill the card
CUDNN_DECODE_MIN_ROWS = 512


def resolve_decode_attention_impl(impl: str, dtype, rows: int | None = None,
                                  cache_len: int = 0) -> str:
  """``decode_attention_impl`` -> ``xla`` | ``cudnn`` for a step of ``rows`` = batch x heads
  queries over a cache of ``cache_len`` positions (rows None: the name is only checked, ``auto``
  returned as it is). ``auto`` is cuDNN on a GPU for bf16/fp16 from ``CUDNN_DECODE_MIN_ROWS``
  rows and an even cache length (an odd one would reach cuDNN through a padded copy of the
  whole cache every step: ``cudnn_attention.even_lengths``), XLA otherwise; ``cudnn`` as for
  ``attention_impl``."""
  if impl not in DECODE_ATTENTION_IMPLS:
    raise ValueError(f"decode_attention_impl {impl!r} is not one of "
                     f"{', '.join(DECODE_ATTENTION_IMPLS)}")
  if impl == "cudnn":
    _check_cudnn("decode_attention_impl", dtype)
  if impl == "auto" and rows is not None:
    fits = rows >= CUDNN_DECODE_MIN_ROWS and cache_len % 2 == 0
    return "cudnn" if _cudnn_usable(dtype) and fits else "xla"
  return impl


def decode_attention_fn(impl: str, dtype):
  """Decoding's attention for ``decode_attention_impl``: ``f(q [B, 1, H, d], k, v [B, S, H, d],
  kv_len [B], scale) -> [B, 1, H, d]``, ``jax.nn.dot_product_attention``'s XLA path or the cuDNN
  kernel (``auto``: chosen from B x H when the step is traced)."""
  resolve_decode_attention_impl(impl, dtype)

  def attend(q, k, v, kv_len, scale):
    name = resolve_decode_attention_impl(impl, dtype, q.shape[0] * q.shape[2], k.shape[1])
    return _attend(name)(q, k, v, kv_len, False, scale, False)
  return attend
