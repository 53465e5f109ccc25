"""``sh2-embed`` through a subprocess: the .npz's names and shapes, pooled rows equal to the
mean of ``embed`` over each record, per-token rows equal to ``embed``, the segmented path, and
bad inputs (one error line listing what is valid, exit 2, nothing written); ``embed`` on
strings."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import sh2_jax
from sh2_jax import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORDS = [("first", "ACGTACGTTTGACCA"), ("second", "ACG"), ("third", "TTTTGGGCCAAGGATCCANNAC")]
LAYERS = ["blocks.1.mlp.l3", "norm"]


@pytest.fixture(scope="module")
def model():
  cfg = sh2_jax.ModelConfig(d_model=32, num_layers=2, layout="SE-MHA", num_heads=2,
                            mlp_hidden=48, se_groups=4, mr_groups=4, max_seqlen=64)
  return sh2_jax.StripedHyena(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
  from sh2_jax.checkpoint import save_model
  root = tmp_path_factory.mktemp("embed")
  save_model(str(root / "ckpt"), model)
  (root / "in.fa").write_text("".join(f">{n} description\n{s}\n" for n, s in RECORDS))
  return root


def _embed_cli(args):
  return subprocess.run([sys.executable, "-m", "sh2_jax.cli.embed", *args], capture_output=True,
                        text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        timeout=300)


def _alone(model, seq):
  return {n: np.asarray(a[0]) for n, a in sh2_jax.embed(model, seq, LAYERS).items()}


def test_pooled_and_per_token_outputs(files, model):
  pooled, per_token = files / "pooled.npz", files / "tokens.npz"
  base = [f"--model={files / 'ckpt'}", f"--fasta={files / 'in.fa'}",
          f"--layers={','.join(LAYERS)}"]
  runs = [[*base, f"--out={pooled}", "--batch_size=2"],
          [*base, f"--out={per_token}", "--pool=none", "--segment_len=8"]]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(_embed_cli, runs))
  for r in results:
    assert r.returncode == 0, r.stderr[-2000:]
    assert "embed: 100%" in r.stderr  # the progress bar
  want = [_alone(model, s) for _, s in RECORDS]
  with np.load(pooled) as z:
    assert sorted(z.files) == sorted(["names", "lengths", *LAYERS])
    assert z["names"].tolist() == [n for n, _ in RECORDS]
    assert z["lengths"].tolist() == [len(s) for _, s in RECORDS]
    for n in LAYERS:
      assert z[n].shape == (3, 32) and z[n].dtype == np.float32
      np.testing.assert_allclose(z[n], [w[n].mean(0) for w in want], rtol=1e-4, atol=1e-5)
  with np.load(per_token) as z:
    assert sorted(z.files) == sorted(["names", "lengths"] +
                                     [f"{n}/{i}" for n in LAYERS for i in range(3)])
    for n in LAYERS:
      for i, (_, s) in enumerate(RECORDS):
        assert z[f"{n}/{i}"].shape == (len(s), 32)
        np.testing.assert_allclose(z[f"{n}/{i}"], want[i][n], rtol=1e-4, atol=1e-5)


def test_bad_inputs(files):
  out = files / "bad.npz"
  base = [f"--model={files / 'ckpt'}", f"--out={out}"]
  fa = f"--fasta={files / 'in.fa'}"
  long = files / "long.fa"
  long.write_text(">big\n" + "A" * 65 + "\n")
  cases = [
      ([*base, fa, "--layers=blocks.9.mlp.l3"],
       "unknown layer name(s) ['blocks.9.mlp.l3']; valid: embedding_layer, norm, blocks.N for "
       "N in 0..1, and blocks.N.<"),
      ([*base, f"--fasta={files / 'missing.fa'}", "--layers=norm"], "missing.fa' does not exist"),
      ([*base, fa], "--layers '' is not valid"),
      ([f"--model={files / 'ckpt'}", fa, "--layers=norm", f"--out={files / 'x.txt'}"],
       "must end in .npz"),
      ([*base, fa, "--layers=norm", "--pool=max"], "--pool"),
      ([*base, f"--fasta={long}", "--layers=norm"], "record 'big' of 65 tokens is more than "
                                                    "the model's max_seqlen 64"),
  ]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(_embed_cli, [args for args, _ in cases]))
  for (args, message), r in zip(cases, results):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (args, r.stderr[-1500:])
    assert lines[-1].startswith("error: ") and message in lines[-1], (args, lines[-2:])
    assert "Traceback" not in r.stderr, args
    assert not out.exists() and not (files / "x.txt").exists(), args


def test_embed_takes_strings(model):
  ids = tokenizer.encode("ACGTTGCA")[None]
  for given in ("ACGTTGCA", b"ACGTTGCA", ["ACGTTGCA"]):
    got = sh2_jax.embed(model, given, ["norm"])["norm"]
    np.testing.assert_array_equal(got, sh2_jax.embed(model, ids, ["norm"])["norm"])
  assert sh2_jax.embed(model, ["ACGT", "TTGA"], ["norm"])["norm"].shape == (2, 4, 32)
  with pytest.raises(ValueError, match=r"strings of different lengths \[3, 4\] do not make one "
                                       "batch; use embed_sequences"):
    sh2_jax.embed(model, ["ACG", "ACGT"], ["norm"])
