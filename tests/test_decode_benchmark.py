"""``benchmarks/decode.py`` on CPU at its small shape: the table with the must-read bytes and
the copy rate, the kernel count from the compiled HLO, ``--profile`` (a trace read back by
``benchmarks/profiling.py``: the CPU thunks stand in for GPU kernels), ``--xla_flag_sets`` (one
child per set; a set that fails is a row, not a crash), and bad input (one error line, exit 2,
nothing written)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--small", "--prompt_len", "40", "--steps", "2", "--reps", "1", "--noprefill"]


def _decode(*args, timeout=300):
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "decode.py"), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT))


def test_decode_table_and_profile(tmp_path):
  proc = _decode(*SMALL, "--batches", "2", "--profile", str(tmp_path / "prof"), "--json_rows",
                 "--decode_attention_impl", "xla")
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = next(line for line in proc.stdout.splitlines() if line.startswith("| 2 |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  ms, gbs, pct, kernels = float(cells[2]), float(cells[4]), cells[9], int(cells[11])
  assert ms > 0 and gbs >= 0 and pct.endswith("%") and float(pct[:-1]) > 0 and kernels > 50
  # the same bytes against the read and GEMV ceilings: each share is the copy share rescaled by
  # the ratio of the ceilings printed
  read, gemv = cells[12], re.match(r"([\d.]+)% \((\d+)\)", cells[13])
  assert read.endswith("%") and float(read[:-1]) > 0 and gemv and float(gemv.group(2)) > 0, cells
  rec = json.loads(next(line for line in proc.stdout.splitlines()
                        if line.startswith("DECODE_JSON "))[len("DECODE_JSON "):])
  assert rec["decode_attention_impl"] == "xla"
  for share, rate in (("pct_read", "read_gbs"), ("pct_gemv", "gemv_gbs")):
    assert np.isclose(rec[share], rec["pct_copy"] * rec["copy_gbs"] / rec[rate], rtol=1e-9), rec
  assert f"{rec['pct_read']:.1f}%" == read and float(gemv.group(1)) == round(rec["pct_gemv"], 1)
  # must-read GB = params + KV + states, each shown
  m = re.match(r"([\d.]+) \(([\d.]+) / ([\d.]+) / ([\d.]+)\)", cells[8])
  assert m and abs(float(m.group(1)) - sum(map(float, m.group(2, 3, 4)))) < 2e-3, cells[8]
  assert "### profile: decode, batch 2" in proc.stdout
  assert "| kernel class | ms/step | share | kernels/step | us/kernel |" in proc.stdout
  assert (tmp_path / "prof" / "decode_profile_batch2.md").exists()
  assert (tmp_path / "prof" / "batch2" / "decode_loop.hlo.txt").exists()


def test_decode_flag_sets_one_child_each():
  proc = _decode(*SMALL, "--batches", "1", "--xla_flag_sets", ";--xla_no_such_flag=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = proc.stdout[proc.stdout.index("| XLA flags |"):].splitlines()
  assert re.match(r"\| \(default\) \| 1 \| [\d.]+ \|", table[2]), table
  assert table[3].startswith("| `--xla_no_such_flag=1` | – | exit "), table


@pytest.mark.parametrize("argv, needle", [
    (["--batches", "0"], "--batches entry 0"),
    (["--steps", "0"], "--steps 0"),
    (["--xla_flag_sets", "--xla_ok=1;--bogus"], "'--bogus'"),
    (["--param_dtype", "float16"], "float16"),
    (["--decode_attention_impl", "fast"], "decode_attention_impl 'fast' is not one of"),
    (["--decode_attention_impl", "cudnn"], "decode_attention_impl 'cudnn' needs a GPU"),
])
def test_decode_bad_input(tmp_path, argv, needle):
  prof = tmp_path / "prof"
  proc = _decode(*SMALL, "--profile", str(prof), *argv, timeout=60)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  assert not prof.exists()


def test_hlo_kernels_counts_the_loop_body_through_command_buffers():
  """A GPU-shaped module: the loop sits in a command buffer of its own, its body in another;
  fusions count by kind, custom calls by target, the command-buffer calls separately."""
  sys.path.insert(0, ROOT)
  from benchmarks.profiling import hlo_kernels, kernel_total
  hlo = """HloModule m

%fused_a (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

%command_buffer.2 (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %f1 = f32[4]{0} fusion(%p0), kind=kLoop, calls=%fused_a
  %g = (f32[4]{0}, s8[64]{0}) custom-call(%f1), custom_call_target="__cublas$gemm"
  %g0 = f32[4]{0} get-tuple-element(%g), index=0
  ROOT %f2 = f32[4]{0} fusion(%g0), kind=kInput, calls=%fused_a
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %c = f32[4]{0} call(%x), to_apply=%command_buffer.2
  %cp = f32[4]{0} copy(%c)
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], f32[4]{0}) tuple(%i, %cp)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  ROOT %k = pred[] constant(true)
}

%command_buffer (a: (s32[], f32[4])) -> (s32[], f32[4]) {
  %a = (s32[], f32[4]{0}) parameter(0)
  ROOT %w = (s32[], f32[4]{0}) while(%a), condition=%cond, body=%body
}

ENTRY %main (a: (s32[], f32[4])) -> (s32[], f32[4]) {
  %a = (s32[], f32[4]{0}) parameter(0)
  ROOT %c = (s32[], f32[4]{0}) call(%a), to_apply=%command_buffer
}
"""
  counts = hlo_kernels(hlo)
  assert counts == {"fusion:kLoop": 1, "fusion:kInput": 1, "custom-call:__cublas$gemm": 1,
                    "copy": 1, "(command buffers)": 1}, counts
  assert kernel_total(counts) == 4


def test_fusion_sources_names_what_a_kernel_computes():
  """A GPU kernel is named after its fusion with ``.`` as ``_`` (a CPU thunk keeps the dot);
  its instruction and called computation come back, long bodies shortened, and kernels that
  are no fusion (a GEMM) are left out."""
  sys.path.insert(0, ROOT)
  from benchmarks.profiling import fusion_sources
  body = "\n".join(f"  %s{i} = bf16[8,4]{{1,0}} slice(%p), slice={{[0:8], [{i}:{i + 4}]}}"
                   for i in range(30))
  hlo = f"""HloModule m

%fused_slice (p: bf16[8,12]) -> bf16[8,4] {{
  %p = bf16[8,12]{{1,0}} parameter(0)
{body}
  ROOT %r = bf16[8,4]{{1,0}} slice(%p), slice={{[0:8], [0:12:3]}}
}}

ENTRY %main (a: bf16[8,12]) -> bf16[8,4] {{
  %a = bf16[8,12]{{1,0}} parameter(0)
  ROOT %loop_slice_fusion.1 = bf16[8,4]{{1,0}} fusion(%a), kind=kLoop, calls=%fused_slice, backend_config={{"x":1}}
}}
"""
  src = fusion_sources(hlo, ["loop_slice_fusion_1", "nvjet_sm90_gemm", "loop_slice_fusion.1"],
                       max_lines=6)
  assert set(src) == {"loop_slice_fusion_1", "loop_slice_fusion.1"}
  text = src["loop_slice_fusion_1"]
  assert text.startswith("ROOT %loop_slice_fusion.1 = bf16[8,4]{1,0} fusion(%a), kind=kLoop")
  assert "backend_config" not in text and "fused_slice:" in text
  assert "%s3 = " in text and "%s10 = " not in text  # shortened to 6 lines
  assert text.endswith("slice={[0:8], [0:12:3]}")  # ... and the root last
  assert len(text.splitlines()) == 2 + 6
