"""Reading a ``jax.profiler`` trace (device time and kernel counts per kernel class) and a
compiled loop's optimized HLO (the kernels one iteration launches).

The one trace parser of the benchmarks (``train_step.py --profile_len``, ``decode.py
--profile``). It needs nothing beyond jax: ``jax.profiler.ProfileData`` reads the
``*.xplane.pb`` the trace wrote. Kernels are the events on the GPU's stream lines (the "XLA
Ops" line names the HLO op each kernel ran for); where a trace has no GPU plane (CPU runs:
smoke tests) the XLA CPU runtime's thunk events, which carry an ``hlo_op`` stat, stand in, so
the tables can be checked anywhere. Classes come from the kernel's name, first match of
``KERNEL_CLASSES`` wins.

XLA GPU executes command buffers (CUDA graphs) op by op while a profiler is active unless
``--xla_enable_command_buffers_during_profiling`` is set, so a traced step can be slower than
an untraced one; the kernel counts are the same either way.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re

KERNEL_CLASSES = [  # (class, regex over kernel names), first match wins
    ("attention (cuDNN)", r"cudnn|fmha|flash|sdpa|_attn"),
    ("GEMV", r"gemv|splitKreduce|split_k|splitk"),
    ("GEMM", r"gemm|xmma|cutlass|nvjet|cublas|matmul|_mma|wgmma|sm90_|(^|_)dot($|_)"),
    ("FFT", r"fft"),
    ("Pallas FIR", r"fir|gated_fir|toeplitz|blocked"),
    ("Pallas modal scan", r"modal"),
    ("collectives", r"nccl|all_gather|all-gather|reduce_scatter|all_to_all|collective|permute"),
    ("memsets", r"memset"),
    ("copies/transposes", r"copy|transpose|memcpy|concatenate|slice|pad"),
    ("reductions", r"reduce|reduction"),
    ("elementwise fusions", r"fusion|loop|input_|convert|multiply|add|wrapped_"),
]


def kernel_class(name: str) -> str:
  return next((c for c, rx in KERNEL_CLASSES if re.search(rx, name, re.I)), "other")


@dataclasses.dataclass
class KernelTimes:
  """Per kernel name: total seconds and launches; ``ops``: seconds per HLO op (GPU only)."""

  seconds: dict[str, float]
  counts: dict[str, int]
  ops: dict[str, float]
  source: str  # "GPU" or "CPU thunks"


def read_trace(trace_dir: str) -> KernelTimes | None:
  """The kernels of the newest trace under ``trace_dir`` (None: no trace file)."""
  from jax.profiler import ProfileData
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    return None
  data = ProfileData.from_file(sorted(files)[-1])
  seconds: dict[str, float] = {}
  counts: dict[str, int] = {}
  ops: dict[str, float] = {}

  def add(name, ns):
    seconds[name] = seconds.get(name, 0.0) + ns * 1e-9
    counts[name] = counts.get(name, 0) + 1

  planes = list(data.planes)
  for plane in planes:
    if not plane.name.startswith("/device:GPU:0"):
      continue
    for line in plane.lines:
      if line.name == "XLA Ops":
        for ev in line.events:
          ops[ev.name] = ops.get(ev.name, 0.0) + ev.duration_ns * 1e-9
      elif "Stream" in line.name:
        for ev in line.events:
          add(ev.name, ev.duration_ns)
  if seconds:
    return KernelTimes(seconds, counts, ops, "GPU")
  for plane in planes:  # no GPU: the XLA CPU runtime's thunks (they name their HLO op)
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      for ev in line.events:  # control-flow thunks enclose kernels: not kernels themselves
        if (any(k == "hlo_op" for k, _ in ev.stats)
            and not re.match(r"(while|call|conditional)(\.|$)", ev.name)):
          add(ev.name, ev.duration_ns)
  return KernelTimes(seconds, counts, ops, "CPU thunks")


def profile_summary(trace_dir: str, steps: int, label: str, top: int = 15) -> str:
  """Markdown: device time and kernel launches per step by class, the top kernels and the top
  XLA ops, over ``steps`` traced steps."""
  kt = read_trace(trace_dir)
  if kt is None:
    return f"{label}: no trace written"
  if not kt.seconds:
    return f"{label}: no kernel events in the trace"
  busy = sum(kt.seconds.values())
  launches = sum(kt.counts.values())
  classes: dict[str, list] = {}
  for name, t in kt.seconds.items():
    c = classes.setdefault(kernel_class(name), [0.0, 0])
    c[0] += t
    c[1] += kt.counts[name]
  lines = [f"### profile: {label} ({steps} steps traced, {kt.source}; kernel time "
           f"{busy / steps * 1e3:.3f} ms/step, {launches / steps:.0f} kernels/step)", "",
           "| kernel class | ms/step | share | kernels/step | us/kernel |", "|---|---|---|---|---|"]
  for cls, (t, n) in sorted(classes.items(), key=lambda kv: -kv[1][0]):
    lines.append(f"| {cls} | {t / steps * 1e3:.3f} | {100 * t / busy:.1f}% | {n / steps:.1f} | "
                 f"{1e6 * t / n:.1f} |")
  lines += ["", "top kernels:", ""]
  for name, t in sorted(kt.seconds.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"- {t / steps * 1e3:8.3f} ms/step {100 * t / busy:5.1f}% "
                 f"{kt.counts[name] / steps:6.1f}/step  {name[:110]}")
  if kt.ops:
    lines += ["", "top XLA ops:", ""]
    for name, t in sorted(kt.ops.items(), key=lambda kv: -kv[1])[:top]:
      lines.append(f"- {t / steps * 1e3:8.3f} ms/step  {name[:110]}")
  return "\n".join(lines)


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """An optimized HLO module's computations: name -> its instruction lines."""
  comps: dict[str, list[str]] = {}
  cur = None
  for line in hlo_text.splitlines():
    m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      cur = m.group(2)
      comps[cur] = []
    elif line.strip() == "}":
      cur = None
    elif cur is not None:  # backend configs (launch dimensions, tiling) are noise here
      comps[cur].append(re.sub(r", backend_config=.*$", "", line.strip()))
  return comps


NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "call", "while",
               "conditional", "after-all", "partition-id", "replica-id", "opt-barrier"}


def hlo_kernels(hlo_text: str) -> collections.Counter:
  """Launch-worthy instructions of a compiled loop's body (one step), by opcode
  (fusions by kind, custom calls by target), from an optimized HLO module's text; computations
  the body calls (command buffers, nested loops) are counted in. Fusions and custom calls
  (GEMMs, cuDNN) are one kernel each on GPU. ``(command buffers)`` counts the body's calls of
  XLA GPU's command-buffer (CUDA graph) regions, not kernels: ``kernel_total`` leaves it out."""
  comps = _computations(hlo_text)
  # The loop may sit inside a command buffer of its own (a WHILE command): the while whose
  # body is largest, wherever it is.
  bodies = [m.group(1) for lines in comps.values() for line in lines
            for m in [re.search(r" while\(.*body=%?([\w.\-]+)", line)] if m]
  body = max(bodies, key=lambda b: len(comps.get(b, [])), default=None)
  counts: collections.Counter = collections.Counter()

  def walk(name, depth=0):
    for line in comps.get(name, []):
      m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = .*? ([a-z][a-z\-]*)\(", line)
      if not m:
        continue
      op = m.group(1)
      for callee in re.findall(r"(?:to_apply|body|branch_computations=\{)=?%?([\w.\-]+)", line):
        if op in ("call", "while", "conditional") and depth < 8:
          if "command_buffer" in callee:  # XLA GPU's outlined CUDA-graph regions
            counts["(command buffers)"] += 1
          walk(callee, depth + 1)
      if op in NOT_KERNELS:
        continue
      kind = re.search(r"kind=(\w+)", line) if op == "fusion" else None
      target = re.search(r'custom_call_target="([^"]+)"', line) if op == "custom-call" else None
      counts[op + (f":{kind.group(1)}" if kind else f":{target.group(1)}" if target else "")] += 1

  if body is not None:
    walk(body)
  return counts


def kernel_total(counts: collections.Counter) -> int:
  return sum(n for op, n in counts.items() if not op.startswith("("))


def fusion_sources(hlo_text: str, kernels: list[str], max_lines: int = 24) -> dict[str, str]:
  """What each named GPU kernel computes: for a kernel of an XLA fusion (its name is the
  fusion instruction's, ``.`` written ``_``; identical fusions share the first one's kernel),
  the fusion instruction (operand and result shapes) and, shortened to ``max_lines``, the
  instructions of the computation it calls, from the optimized HLO (``compiled.as_text()``).
  Kernels that name no fusion (GEMMs, cuDNN, Pallas) are left out."""
  comps = _computations(hlo_text)
  by_kernel: dict[str, tuple[str, str]] = {}
  for lines in comps.values():
    for line in lines:
      m = re.match(r"(?:ROOT )?%?([\w.\-]+) = .*? fusion\(.*calls=%?([\w.\-]+)", line)
      if m:  # GPU kernels write the name with underscores, CPU thunks as it is
        for key in (m.group(1), m.group(1).replace(".", "_").replace("-", "_")):
          by_kernel.setdefault(key, (line, m.group(2)))
  out = {}
  for name in kernels:
    if name not in by_kernel:
      continue
    line, callee = by_kernel[name]
    body = comps.get(callee, [])
    shown = body if len(body) <= max_lines else body[:max_lines - 1] + [
        f"... {len(body) - max_lines + 1} more, then: {body[-1]}"]
    out[name] = "\n".join([line, f"{callee}:"] + ["  " + x for x in shown])
  return out


def fusion_report(hlo_text: str, trace_dir: str, steps: int, top: int = 8) -> str:
  """Markdown: the HLO of the ``top`` slowest fusion kernels of the trace (``fusion_sources``),
  each under its time per step, so a profile's kernel names say what they compute."""
  kt = read_trace(trace_dir)
  if kt is None or not kt.seconds:
    return ""
  ranked = [n for n, _ in sorted(kt.seconds.items(), key=lambda kv: -kv[1])]
  src = fusion_sources(hlo_text, ranked)
  lines = ["", "fusion kernels, slowest first (the optimized HLO each runs):", ""]
  for name in [n for n in ranked if n in src][:top]:
    lines += [f"**{name}**: {kt.seconds[name] / steps * 1e3:.3f} ms/step, "
              f"{kt.counts[name] / steps:.1f}/step", "", "```", src[name], "```", ""]
  return "\n".join(lines) if len(lines) > 3 else ""
