"""The benchmarks' plumbing on CPU (``--smoke``). The training step: both models run, the table
and JSON rows come out, the held-out loss (the benchmark's leak check) is reported, and a point
predicted over the time budget is a note. The vortex peer: its command line, the shape check,
our side, and the merged tables (its torch side needs a CUDA device and runs only on the GPU
machine)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(script: str, *args, timeout=600) -> subprocess.CompletedProcess:
  """``python benchmarks/SCRIPT ARGS`` from the repository root, output captured."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_train_step_smoke(tmp_path):
  """Both models measured at the first length (step time, held-out loss, profile); at the second
  (4096x longer) each is skipped by the time budget on the cost predicted from the first, a
  note in its row and in the table."""
  # --featurizer v0 is fir.featurize itself: the model's numbers, through the patch path
  proc = _bench("train_step.py", "--smoke", "--featurizer", "v0", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "train_step.jsonl")]
  steps = [r for r in rows if r.get("kind") == "step"]
  assert all(r["featurizer"] == "v0" for r in steps), steps
  models = {"SH2 (Evo 2 7B layout)", "Transformer (all MHA)"}
  ran = [r for r in steps if r["L"] == 256]
  assert {r["model"] for r in ran} == models and len(ran) == 2, steps
  for r in ran:
    assert r["step_s"] > 0, r
    # random bytes: a fresh batch's loss stays near ln 256 = 5.55 after a few steps
    assert 4.5 < r["heldout_loss"] < 8.0, r
  skipped = [r for r in steps if r["L"] != 256]
  assert {r["model"] for r in skipped} == models and len(skipped) == 2, steps
  for r in skipped:
    assert r["L"] == 1 << 20 and r["step_s"] is None, r
    assert r["note"].startswith("not run: time budget (predicted "), r
  assert "| L | SH2 ms/step" in proc.stdout
  assert "| 1024K | not run: time budget (predicted " in proc.stdout
  # the profile names what its slowest fusions compute (CPU thunks stand in for kernels)
  prof = (tmp_path / "profile.md").read_text()
  assert "### profile: SH2" in prof and "### profile: Transformer" in prof
  assert prof.count("fusion kernels, slowest first") == 2 and " fusion(" in prof


def test_train_step_bad_featurizer_is_one_error_line():
  proc = _bench("train_step.py", "--smoke", "--featurizer", "fastest")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "--featurizer 'fastest' is not one of ['parts'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_train_step_takes_the_fastest_remat_that_fits(monkeypatch):
  """``--remat auto``: XLA's memory analysis of each compiled setting, fastest first, against
  the device's limit (patched here: CPU reports none). A two-layer model (SE, MR) at 256 tokens:
  the selection is the same at any size; each setting is compiled at most twice."""
  import pytest
  sys.path.insert(0, ROOT)
  from benchmarks import train_step as ts
  from benchmarks.transformer import evo2_7b_layout
  cfg = evo2_7b_layout(128, 2, dtype="float32", conv_impl="xla", attention_impl="xla",
                       li_impl="fft")
  free = ts.Point(cfg, 256, "auto", None)
  assert free.remat == "none" and list(free.memory) == ["none"]
  # a limit just under what "none" needs: the next setting that fits is taken
  limit = int(free.memory["none"] / ts.FIT_SHARE) - 1
  monkeypatch.setattr(ts, "device_memory_limit", lambda: limit)
  tight = ts.Point(cfg, 256, "auto", None)
  assert tight.remat in ("dots", "blocks") and list(tight.memory)[0] == "none"
  assert tight.memory[tight.remat] <= ts.FIT_SHARE * limit < tight.memory["none"]
  assert tight.run(1) > 0
  # nothing left fits: the error names the totals of the settings tried (the skipped not among
  # them); "none" and "dots" were compiled above, so only "blocks" is tried here
  monkeypatch.setattr(ts, "device_memory_limit", lambda: 1)
  with pytest.raises(MemoryError, match=r"no remat setting fits .*compiled totals \{'blocks': "):
    ts.Point(cfg, 256, "auto", None, skip=("none", "dots"))
  # a setting that ran out of memory on its first step is skipped on the retry
  monkeypatch.setattr(ts, "device_memory_limit", lambda: None)
  retry = ts.Point(cfg, 256, "auto", None, skip=("none",))
  assert retry.remat == "dots" and list(retry.memory) == ["dots"]


def test_train_step_rejects_a_bad_memory_fraction():
  proc = _bench("train_step.py", "--smoke", "--mem_fraction", "1.5")
  assert proc.returncode == 2 and "--mem_fraction 1.5 is outside 0.1..0.98" in proc.stderr


# ----------------------------------------------------------------------------- vortex_peer

# The shape fields of vortex's configs/evo2-7b-8k.yml (what our converter reads).
EVO2_7B_8K = dict(hidden_size=4096, num_layers=32, vocab_size=512, num_attention_heads=32,
                  inner_mlp_size=11008, hcs_filter_groups=256, hcm_filter_groups=256,
                  hcl_filter_groups=4096, hcs_filter_length=7, hcm_filter_length=128,
                  short_filter_length=3, state_size=16, rotary_emb_base=10000,
                  max_seqlen=32768, eps=1e-6, evo2_style_activations=True, interleave=True,
                  column_split_hyena=False, hyena_flip_x1x2=False,
                  hcs_layer_idxs=[0, 4, 7, 11, 14, 18, 21, 25, 28],
                  hcm_layer_idxs=[1, 5, 8, 12, 15, 19, 22, 26, 29],
                  hcl_layer_idxs=[2, 6, 9, 13, 16, 20, 23, 27, 30],
                  attn_layer_idxs=[3, 10, 17, 24, 31])


def _vortex_peer(*args, timeout=300):
  return _bench("vortex_peer.py", *args, timeout=timeout)


def test_vortex_peer_smoke(tmp_path):
  """Both sides' plumbing on CPU: the vortex side is skipped with a note (no torch + CUDA here),
  our forward and ``decode.py`` run, their rows are merged into one JSONL and the tables."""
  proc = _vortex_peer("--smoke", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "vortex_peer.jsonl")]
  vortex = [r for r in rows if r.get("impl") == "vortex"]
  assert vortex and all(r["kind"] in ("skipped", "config", "forward", "decode") for r in vortex)
  if vortex[0]["kind"] == "skipped":
    assert "skip: vortex side:" in proc.stdout
  fwd = [r for r in rows if r["kind"] == "forward" and r["impl"] == "sh2_jax"]
  assert [r["L"] for r in fwd] == [256] and fwd[0]["ms"] > 0 and fwd[0]["tokens_per_s"] > 0
  dec = sorted((r for r in rows if r["kind"] == "decode" and r["impl"] == "sh2_jax"),
               key=lambda r: r["batch"])
  assert [r["batch"] for r in dec] == [1, 2], dec
  for r in dec:  # read back from decode.py's table, against this run's copy rate
    assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["pct_copy"] > 0, r
    assert r["command"].startswith("python benchmarks/vortex_peer.py --smoke")
  md = open(tmp_path / "vortex_peer.md").read()
  assert "| L | vortex ms |" in md and "| batch | vortex ms/step |" in md
  # the result files name no folder of this machine: the output folder is recorded as OUT
  assert {r["command"] for r in rows if "command" in r} == {
      "python benchmarks/vortex_peer.py --smoke --out OUT"}
  assert str(tmp_path) not in open(tmp_path / "vortex_peer.jsonl").read() + md


def test_vortex_peer_records_paths_by_role():
  sys.path.insert(0, ROOT)
  from benchmarks.vortex_peer import portable_command
  assert portable_command(["--out=/a/b", "--vortex_src", "/c/vortex", "--config",
                           "/c/vortex/configs/evo2-7b-8k.yml", "--lengths", "8192"]) == (
      "python benchmarks/vortex_peer.py --out OUT --vortex_src VORTEX_SRC --config "
      "evo2-7b-8k.yml --lengths 8192")
  assert portable_command(["--vortex_src", ".vortex", "--out"]) == (
      "python benchmarks/vortex_peer.py --vortex_src .vortex --out")  # a flag without value


@pytest.mark.parametrize("argv, needle", [
    (["--lengths", "8192,abc"], "'abc'"),
    (["--batches", "0"], "'0'"),
    (["--side", "sideways"], "'sideways'"),
    (["--attn", "fast"], "'fast'"),
    (["--budget_s", "-1"], "--budget_s -1"),
    (["--set", "novalue"], "'novalue'"),
    (["--vortex_src", "no/such/dir"], "'no/such/dir'"),
    (["--config", "x.yml"], "--config needs --vortex_src"),
    (["--report", "no/such.jsonl"], "'no/such.jsonl'"),
])
def test_vortex_peer_bad_input(tmp_path, argv, needle):
  out = tmp_path / "out"
  proc = _vortex_peer("--smoke", "--out", str(out), *argv, timeout=60)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  assert not out.exists()  # nothing written


def test_vortex_peer_refuses_a_config_of_another_shape(tmp_path):
  """The vortex YAML is read by our converter and compared with the preset before any run."""
  import yaml
  src = tmp_path / "vortex"
  (src / "vortex" / "model").mkdir(parents=True)
  (src / "vortex" / "model" / "model.py").write_text("")
  (src / "configs").mkdir()
  (src / "configs" / "evo2-7b-8k.yml").write_text(yaml.safe_dump(dict(EVO2_7B_8K,
                                                                      inner_mlp_size=11264)))
  out = tmp_path / "out"
  proc = _vortex_peer("--side", "ours", "--vortex_src", str(src), "--out", str(out), timeout=120)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "mlp_hidden 11264 vs ours 11008" in proc.stderr and not out.exists()


def test_vortex_peer_tables_merge_both_sides(tmp_path):
  sys.path.insert(0, ROOT)
  from benchmarks import vortex_peer
  base = dict(device="NVIDIA H200", date="2026-12-01 12:00 UTC", command="python x")
  rows = [dict(kind="forward", impl="vortex", L=8192, batch=1, ms=300.0, tokens_per_s=27306, **base),
          dict(kind="forward", impl="sh2_jax", L=8192, batch=1, ms=100.0, tokens_per_s=81920, **base),
          dict(kind="forward", impl="vortex", L=131072, batch=1, ms=None, note="OOM", **base),
          dict(kind="decode", impl="vortex", L=8192, batch=1, ms=40.0, tokens_per_s=25, gbs=330.0,
               pct_copy=7.7, **base),
          dict(kind="decode", impl="sh2_jax", L=8192, batch=1, ms=4.0, tokens_per_s=250,
               gbs=3300.0, pct_copy=77.0, **base),
          dict(kind="skipped", impl="vortex", note="not run: time budget", **base),
          # merged calls: the first call's note, then a second call's measurement of that point
          dict(kind="forward", impl="vortex", L=32768, batch=1, ms=1300.0, tokens_per_s=25206,
               **base),
          dict(kind="forward", impl="sh2_jax", L=32768, batch=1, ms=None,
               note="not run: time budget", **base),
          dict(kind="forward", impl="sh2_jax", L=32768, batch=1, ms=650.0, tokens_per_s=50412,
               **base)]
  text = vortex_peer.report(rows, str(tmp_path))
  assert "| 8K | 300.0 | 27306 | 100.0 | 81920 | 3.00x |" in text
  assert "| 32K | 1300 | 25206 | 650.0 | 50412 | 2.00x |" in text
  assert "| 128K | OOM | – | – | – | – |" in text
  assert "| 1 | 40.0 | 25 | 330 (8%) | 4.000 | 250 | 3300 (77%) | 10.00x |" in text
  assert "- vortex: not run: time budget" in text
  assert open(tmp_path / "vortex_peer.md").read().strip() == text.strip()


# ----------------------------------------------------------------------------- featurizer

def test_featurizer_blocked_layout_is_the_same_math(monkeypatch):
  """The blocked candidate reproduces ``fir.featurize`` after the column permutation, forward
  and both gradients (odd L, B 2); with the permutation wrong the check sees it."""
  sys.path.insert(0, ROOT)
  from benchmarks import featurizer
  err = featurizer.check(8, 37)
  assert max(err.values()) < 1e-5, err
  perm = featurizer.blocked_perm(4)
  assert list(perm[:4]) == [0, 3, 6, 9] and sorted(perm) == list(range(12))
  monkeypatch.setattr(featurizer, "blocked_perm", lambda d: np.arange(3 * d))
  assert min(featurizer.check(8, 37).values()) > 0.1


def test_featurizer_variants_are_the_same_math(monkeypatch):
  """Every candidate formulation reproduces ``fir.featurize`` (forward, dz, dw; odd L, B 2), and
  the check sees a wrong one (a tap dropped)."""
  sys.path.insert(0, ROOT)
  from benchmarks import featurizer
  err = featurizer.check_variants(8, 37)
  assert set(err) == set(featurizer.VARIANTS) and max(err.values()) < 1e-4, err
  from sh2_jax.ops import fir
  wrong = lambda z, w: fir.featurize(z, w.at[:, 2].set(0.0))  # noqa: E731
  monkeypatch.setattr(featurizer, "VARIANTS", {"wrong": wrong})
  assert featurizer.check_variants(8, 37)["wrong"] > 0.1


def test_train_step_puts_the_featurizer_candidate_in_the_model(monkeypatch):
  """``--featurizer NAME``: the model's ``fir.featurize`` is the named candidate."""
  sys.path.insert(0, ROOT)
  from benchmarks import featurizer, train_step as ts
  from sh2_jax.ops import fir
  monkeypatch.setattr(fir, "featurize", fir.featurize)  # restored after the test
  ts.use_featurizer("vectors")
  assert fir.featurize is featurizer.VARIANTS["tap vectors (fwd + bwd)"]
  assert fir.featurize is not featurizer.VARIANTS["v0 (fir.featurize)"]


def test_featurizer_smoke(tmp_path):
  proc = _bench("featurizer.py", "--smoke", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "featurizer.jsonl")]
  layouts = [r["layout"] for r in rows if r["kind"] == "featurizer"]
  assert layouts == ["interleaved (fir.featurize)", "blocked", "weight permuted at use (D x 3D)"]
  assert all(r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 for r in rows if r["kind"] == "featurizer")
  assert "| L | layout | fwd ms" in proc.stdout
