"""Exact resume of a real ``train.py`` process after SIGKILL, fallback past a damaged
checkpoint, and evaluation of the training checkpoint (``--mode=eval`` and ``load_model``)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, EVERY = 40, 5
ARGS = ["--config=configs/tiny.py", "--config.model.d_model=32", "--config.model.mlp_hidden=64",
        "--config.model.se_groups=4", "--config.model.mr_groups=4", "--config.model.mr_len=16",
        "--config.seq_len=32", "--config.batch_size=4", f"--config.num_steps={STEPS}",
        "--config.log_every=1", f"--config.checkpoint_every={EVERY}", "--config.eval_every=0",
        "--config.keep_checkpoints=3"]
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},  # one CPU device
       "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _start(workdir, *extra):
  return subprocess.Popen([sys.executable, "train.py", *ARGS, f"--workdir={workdir}", *extra],
                          cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc):
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  return out


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}, [r["step"] for r in records]


def _logged_step(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = [l for l in f.read().splitlines() if l.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0
  except FileNotFoundError:
    return 0


def test_sigkill_resume_damaged_fallback_and_eval(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  reference = _start(full)  # the uninterrupted run, concurrently with the one we kill
  # the second starts once the first has logged a step: it then loads the programs the first
  # compiled (the tests' shared compilation cache, tests/conftest.py) instead of compiling them
  deadline = time.time() + 240
  while _logged_step(full) < 1 and reference.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  victim = _start(killed)
  while _logged_step(killed) < 2 * EVERY + 3 and victim.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert victim.poll() is None, "the run finished before it could be killed"
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  killed_at = _logged_step(killed)
  assert killed_at < STEPS
  _finish(reference)
  want, steps = _losses(full)
  assert steps == list(range(1, STEPS + 1))
  assert want[STEPS] < want[1] - 0.5  # it learns

  out = _finish(_start(killed))  # the same command again
  assert "resuming from checkpoint step" in out
  resumed_from = int(out.split("resuming from checkpoint step ")[1].split()[0])
  assert EVERY <= resumed_from <= killed_at and resumed_from % EVERY == 0
  got, steps = _losses(killed)
  assert steps == list(range(1, STEPS + 1))  # records after the checkpoint were replaced
  assert got == want  # bit-identical losses, before and after the kill

  # Damage the latest checkpoint: the run reports it and resumes from the previous one.
  params = killed / "checkpoints" / str(STEPS) / "params"
  for root, _, names in os.walk(params):
    for n in names:
      with open(os.path.join(root, n), "r+b") as f:
        f.write(b"garbage" * 8)
        f.truncate(40)
  out = _finish(_start(killed))
  assert f"checkpoint step {STEPS}" in out and "is damaged" in out, out[-3000:]
  assert f"resuming from checkpoint step {STEPS - EVERY}" in out
  assert (killed / "checkpoints" / f"{STEPS}.damaged").is_dir()
  got, steps = _losses(killed)
  assert steps == list(range(1, STEPS + 1)) and got == want

  # Evaluation of the training checkpoint: CLI (JSON summary) and the library loader.
  r = subprocess.run([sys.executable, "train.py", *ARGS, f"--workdir={full}", "--mode=eval",
                      "--config.eval_batches=2"], cwd=ROOT, env=ENV, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["tokens"] == 2 * 4 * 32
  assert np.isclose(summary["perplexity"], np.exp(summary["loss"]))
  assert np.isclose(summary["bits_per_byte"], summary["loss"] / np.log(2))
  assert summary["loss"] < want[1] - 0.5
