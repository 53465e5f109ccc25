"""Bad values at the library's entry points and in generate.py: one clear error naming the
value (exit code 2 and one ``error:`` line for the command), never NaN output or a traceback."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sh2_jax
from sh2_jax.embed import mean_pool
from sh2_jax.presets import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
  return sh2_jax.StripedHyena(get_preset("tiny"), rngs=nnx.Rngs(0))


def test_token_ids_outside_the_vocabulary(model):
  bad = jnp.asarray([[1, 2, 600]], jnp.int32)
  for call in (lambda: sh2_jax.embed(model, bad, ["blocks.0.mlp.l3"]),
               lambda: sh2_jax.score(model, bad),
               lambda: sh2_jax.segmented_score(model, bad, segment_len=2),
               lambda: model(bad)):
    with pytest.raises(ValueError, match="token id 600 (is )?outside the vocabulary 0..511"):
      call()
  with pytest.raises(ValueError, match="token id -1 is outside"):
    model(jnp.asarray([[1, -1]], jnp.int32))


def test_empty_tokens_and_layer_names(model):
  empty = jnp.zeros((1, 0), jnp.int32)
  with pytest.raises(ValueError, match="tokens are empty"):
    sh2_jax.embed(model, empty, ["blocks.0.mlp.l3"])
  with pytest.raises(ValueError, match="tokens are empty"):
    sh2_jax.segmented_score(model, empty, segment_len=4)
  with pytest.raises(ValueError, match=r"layers must be a list of names, e.g. \['blocks.0.mlp"):
    sh2_jax.embed(model, jnp.ones((1, 4), jnp.int32), "blocks.0.mlp.l3")
  with pytest.raises(ValueError, match=r"lengths has shape \(3,\); expected one length per row"):
    mean_pool(jnp.ones((2, 5, 4)), jnp.asarray([1, 2, 3]))


@pytest.mark.parametrize("field,value", [("max_seqlen", -4), ("eps", -1e-6), ("eps", 0.0)])
def test_model_config_values(field, value):
  with pytest.raises(ValueError, match=f"{field} {value!r} is not valid"):
    sh2_jax.ModelConfig(**{field: value})


def _generate(args):
  return subprocess.run([sys.executable, "generate.py", *args], capture_output=True, text=True,
                        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)


def test_generate_bad_flags_are_one_error_line(tmp_path):
  binary = tmp_path / "bin.fa"
  binary.write_bytes(b"\x00\xff\xfe binary")
  cases = [
      (["--model=tiny", "--prompt=ACGT", "--max_new_tokens=0"], "--max_new_tokens 0"),
      (["--model=tiny", "--prompt=ACGT", "--dtype=bogus"], "--dtype 'bogus' is not valid"),
      (["--model=tiny", f"--fasta={binary}"], "is not a text FASTA file"),
      (["--model=tiny", "--prompt=ACGT", "--top_p=2"], "--top_p 2.0 is not valid"),
      (["--model=tiny", "--prompt=ACGT", "--temperature=-1"], "--temperature -1.0"),
      (["--model=nope", "--prompt=ACGT"], "'nope' is neither a checkpoint directory"),
      (["--model=tiny", "--prompt=ACGT", "--max_new_tokens=abc"], "--max_new_tokens=abc"),
      (["--model=tiny", "--prompt=" + "A" * 300], "a prompt of 300 tokens plus"),
      (["--model=tiny", f"--fasta={tmp_path / 'none.fa'}"], "No such file"),
      (["--model=tiny", "--prompt=ACGT", "--stop=xy"], "--stop entry 'xy'"),
      (["--prompt=ACGT"], "--model is required"),
  ]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = list(pool.map(_generate, [args for args, _ in cases]))
  for (args, message), r in zip(cases, results):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (args, r.stderr[-1500:])
    assert lines[-1].startswith("error: ") and message in lines[-1], (args, lines[-2:])
    assert "Traceback" not in r.stderr, args
