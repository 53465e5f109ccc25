"""The model checks every command shares (``sh2_jax/checks.py``): each bad value is one
ValueError naming it, from the abstract model (nothing allocated), and the same value gets the
same line from every command (exit code 2, nothing written)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import sh2_jax
from sh2_jax import checks
from sh2_jax.checkpoint import save_model
from sh2_jax.flops import param_count
from sh2_jax.presets import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
MESH1 = {"data": 1, "fsdp": 1, "context": 1}
ON_CPU = jax.default_backend() == "cpu"


@pytest.mark.skipif(not ON_CPU, reason="the CPU's refusals")
def test_backend_names_what_cannot_run_on_cpu():
  for field, value, message in [
      ("conv_impl", "pallas", "conv_impl 'pallas' needs a GPU backend"),
      ("li_impl", "modal_scan", "li_impl 'modal_scan' needs a GPU backend"),
      ("attention_impl", "cudnn", "attention_impl 'cudnn' needs a GPU backend"),
      ("decode_attention_impl", "cudnn", "decode_attention_impl 'cudnn' needs a GPU backend"),
      ("dtype", "float16", "dtype 'float16' needs a GPU backend, but JAX runs on 'cpu'; use "
                           "float32 or bfloat16")]:
    with pytest.raises(ValueError, match=message):
      checks.backend(get_preset("tiny", **{field: value}))
  checks.backend(get_preset("tiny", dtype="bfloat16"))


def test_lengths_and_token_ids():
  checks.length("seq_len 256", 256, 256)
  with pytest.raises(ValueError, match="^seq_len 300 is more than the model's max_seqlen 256$"):
    checks.length("seq_len 300", 300, 256)
  rows = [np.array([65, 67]), np.array([65, 122])]
  checks.token_ids(rows, ["a", "b"], 256)
  with pytest.raises(ValueError, match=r"^b has token id 122 \('z'\) outside the vocabulary "
                                       r"0\.\.99$"):
    checks.token_ids(rows, ["a", "b"], 100)
  with pytest.raises(ValueError, match="^a has token id -1 outside the vocabulary 0..99$"):
    checks.token_ids([np.array([-1])], ["a"], 100)


def test_fsdp_names_the_parameter_its_shape_and_the_mesh():
  params, specs = checks.abstract_params(get_preset("tiny"))
  checks.fsdp(params, specs, {**MESH1, "fsdp": 2})
  with pytest.raises(ValueError, match=r"^parameter blocks\.0\.mlp\.l1\.kernel of shape "
                                       r"\(128, 256\) cannot be sharded over mesh\.fsdp 3 x "
                                       r"mesh\.context 1 \(= 3 devices\): 128 is not divisible"):
    checks.fsdp(params, specs, {**MESH1, "fsdp": 3})


def test_memory_counts_parameters_and_optimizer_state_per_device():
  cfg = get_preset("tiny")
  params, specs = checks.abstract_params(cfg)
  one = checks.memory(params, specs)
  assert one == 4 * param_count(cfg)  # float32, all on one device
  assert checks.memory(params, specs, {**MESH1, "fsdp": 2}) < one  # the sharded half
  with pytest.raises(ValueError, match=r"^the model's parameters need 2\.8 MiB on one device, "
                                       r"more than 1\.0 MiB \(the given limit\); x$"):
    checks.memory(params, specs, limit=2**20, hint="; x")
  adam = {"mu": params, "nu": params}
  with pytest.raises(ValueError, match=r"^the model needs 8\.4 MiB per device on mesh .* for "
                                       r"its parameters \(2\.8 MiB\) and optimizer state "
                                       r"\(5\.6 MiB\) alone"):
    checks.memory(params, specs, MESH1, adam, limit=2**20)
  limit, where = checks.device_memory()
  assert limit > 2**28 and ("host" in where) == ON_CPU  # CPU: the host's physical memory


def test_a_width_of_a_million_is_refused_without_allocating():
  huge = get_preset("tiny", d_model=2**20, mlp_hidden=256)
  with pytest.raises(ValueError, match=r"the model's parameters need 64\.0 TiB on one device"):
    checks.model(huge)
  with pytest.raises(ValueError, match=r"the model's parameters need 64\.0 TiB"):
    sh2_jax.load("random:tiny", d_model=2**20, mlp_hidden=256)


def _run(args, **env):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                        env={**ENV, **env}, timeout=300)


def _one_error_line(r, args):
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2, (args, r.stderr[-2000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), (args, lines[-5:])
  return lines[0]


def test_every_command_gives_the_same_line(tmp_path):
  """A checkpoint whose conv_impl cannot run here: eval, generate, score and embed refuse it
  with the same line; a byte outside a small model's vocabulary, the same line from score and
  embed; float16 compute on CPU, the same line from train and generate; an FSDP size that does
  not divide a parameter and a model too large for the machine: one line from training before
  its workdir exists."""
  pallas, small = str(tmp_path / "pallas"), str(tmp_path / "small")
  save_model(pallas, sh2_jax.StripedHyena(get_preset("tiny", conv_impl="pallas"),
                                          rngs=nnx.Rngs(0)))
  save_model(small, sh2_jax.StripedHyena(get_preset("tiny", vocab_size=100), rngs=nnx.Rngs(0)))
  fasta = tmp_path / "in.fa"
  fasta.write_text(">a\nACGT\n>b\nACzz\n")
  out = tmp_path / "out"
  work = tmp_path / "w"
  same_impl = [
      ["train.py", "--config=tiny", f"--workdir={pallas}", "--mode=eval"],
      ["generate.py", f"--model={pallas}", "--prompt=ACGT"],
      ["-m", "sh2_jax.cli.score", f"--model={pallas}", f"--fasta={fasta}", f"--out={out}.tsv"],
      ["-m", "sh2_jax.cli.embed", f"--model={pallas}", f"--fasta={fasta}", "--layers=norm",
       f"--out={out}.npz"]]
  same_vocab = [
      ["-m", "sh2_jax.cli.score", f"--model={small}", f"--fasta={fasta}", f"--out={out}.tsv"],
      ["-m", "sh2_jax.cli.embed", f"--model={small}", f"--fasta={fasta}", "--layers=norm",
       f"--out={out}.npz"]]
  same_dtype = [["train.py", "--config=tiny", f"--workdir={work}", "--config.model.dtype=float16"],
                ["generate.py", "--model=random:tiny", "--prompt=ACGT", "--dtype=float16"]]
  train = [["train.py", "--config=tiny", f"--workdir={work}", "--config.model.d_model=1048576"],
           ["train.py", "--config=tiny", f"--workdir={work}", "--config.mesh.fsdp=3",
            "--config.batch_size=6"]]
  commands = same_impl + same_vocab + same_dtype + train
  envs = [{}] * (len(commands) - 1) + [{"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = list(pool.map(lambda a_e: _run(a_e[0], **a_e[1]), zip(commands, envs)))
  lines = [_one_error_line(r, args) for args, r in zip(commands, results)]
  impl, vocab, dtype, (memory, fsdp) = lines[:4], lines[4:6], lines[6:8], lines[8:]
  assert set(dtype) == {"error: dtype 'float16' needs a GPU backend, but JAX runs on 'cpu'; use "
                        "float32 or bfloat16"}, dtype
  assert set(impl) == {"error: conv_impl 'pallas' needs a GPU backend, but JAX runs on 'cpu'; "
                       "use conv_impl 'auto', 'xla' or 'fft'"}, impl
  assert set(vocab) == {"error: --fasta record 'b' has token id 122 ('z') outside the "
                        "vocabulary 0..99"}, vocab
  assert memory.startswith("error: the model needs ") and "TiB per device" in memory and (
      "optimizer state" in memory and "--memory" in memory), memory
  assert fsdp.startswith("error: parameter blocks.0.mlp.l1.kernel of shape (128, 256) cannot be "
                         "sharded over mesh.fsdp 3"), fsdp
  assert not work.exists() and not os.path.exists(f"{out}.tsv") and not os.path.exists(
      f"{out}.npz")


def test_eval_checks_the_checkpoints_model_against_the_data(tmp_path):
  """Eval runs the checkpoint's model, not config.model: its max_seqlen and vocabulary must fit
  the windows."""
  from sh2_jax.configs.base import make_config
  from sh2_jax.train.evaluate import prepare_eval
  for name, kw, message in [
      ("short", dict(max_seqlen=64), "^seq_len 128 is more than the model's max_seqlen 64; "
                                     "shorten seq_len$"),
      ("small", dict(vocab_size=100), "^the checkpoint's model.vocab_size 100 is below the 256 "
                                      "byte tokens")]:
    path = str(tmp_path / name)
    save_model(path, sh2_jax.StripedHyena(get_preset("tiny", **kw), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=message):
      prepare_eval(make_config("tiny"), path)


def test_a_workdir_under_a_file_is_an_input_error(tmp_path):
  from sh2_jax.configs.base import make_config
  from sh2_jax.train.trainer import prepare_train
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=f"^--workdir '{blocker}/w': '{blocker}' is a file, not a "
                                       "directory$"):
    prepare_train(make_config("tiny"), str(blocker / "w"))
  with pytest.raises(ValueError, match=f"^--workdir '{blocker}' is a file, not a directory$"):
    prepare_train(make_config("tiny"), str(blocker))
