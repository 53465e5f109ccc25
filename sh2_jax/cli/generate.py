"""Generate DNA (or any bytes) from a checkpoint or a preset (``sh2-generate``; ``python
generate.py`` in a checkout). Writes FASTA to stdout.

  sh2-generate --model evo2_7b_base --prompt ACGTACGT --max_new_tokens 64 > out.fa
  sh2-generate --model CKPT_DIR --fasta prompts.fa --temperature 0.7 --top_k 4 --logprobs lp.tsv

A FASTA file's records run as one batch (prompts of different lengths are fine). ``--model`` is
anything ``sh2_jax.load`` takes: a checkpoint directory, a released model's name (its weights,
from the local cache or the Hugging Face hub), or ``random:NAME`` for random weights (to try the
pipeline, not for biology; ``tiny`` has no released weights and is always random).

Each output record is the prompt followed by its continuation, wrapped at ``--line_width``;
the header is the prompt's name plus ``key=value`` fields: ``prompt_len`` (the first that many
characters are the prompt), ``new_tokens``, ``stopped`` (a ``--stop`` token ended it; the stop
token itself is not written), the sampling settings and, when non-zero, ``unprintable`` (tokens
a FASTA line cannot hold — whitespace, control bytes, ``>``, ``;``, non-ASCII, ids >= 256 —
written as ``X``). ``--logprobs FILE`` writes every generated token (stop token included) as a
TSV row: record, step, token id, and the model's log-probability of it (natural log, before
temperature, top-k and top-p).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
from absl import flags

from sh2_jax.cli import common
from sh2_jax.cli.launch import fail, launch

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "checkpoint directory (ours or a converted Evo 2), a model "
                    "name (evo2_7b_base, evo2_7b, ...) or random:NAME")
flags.DEFINE_string("prompt", None, "prompt string")
flags.DEFINE_string("fasta", None, "FASTA file: every record is one prompt")
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt")
flags.DEFINE_float("temperature", 0.0, "0 is greedy")
flags.DEFINE_integer("top_k", None, "sample among the k most likely tokens")
flags.DEFINE_float("top_p", None, "nucleus sampling mass")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_list("stop", [], "stop strings of one character each (e.g. '>'), or token ids")
flags.DEFINE_string("dtype", None, "compute dtype, e.g. bfloat16 (default: the checkpoint's)")
flags.DEFINE_integer("line_width", 80, "FASTA sequence line width; 0 writes one line")
flags.DEFINE_string("logprobs", None, "also write each generated token's log-probability to "
                    "this TSV file (record, step, token, logprob)")
# Bytes a FASTA sequence line can hold: printable ASCII without the space and without the
# header ('>') and comment (';') markers, so that no wrapped line can start a new record.
FASTA_BYTES = frozenset(range(0x21, 0x7f)) - {ord(">"), ord(";")}
UNPRINTABLE = "X"


def stop_ids(stops: list[str]) -> list[int]:
  ids = []
  for s in stops:
    if s.isdigit():
      ids.append(int(s))
    elif len(s.encode()) == 1:
      ids.append(s.encode()[0])
    else:
      raise ValueError(f"--stop entry {s!r} must be one character or a token id")
  return ids


def check_flags() -> None:
  """Every flag value, before any model is loaded (errors name the value and what is valid)."""
  f = FLAGS
  if f.model is None:
    raise ValueError("--model is required (a checkpoint directory or a model name)")
  if (f.prompt is None) == (f.fasta is None):
    raise ValueError("give exactly one of --prompt or --fasta")
  if f.prompt is not None and not f.prompt:
    raise ValueError("--prompt is empty; give at least one character")
  if f.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens {f.max_new_tokens} is not valid; expected >= 1")
  if not (math.isfinite(f.temperature) and f.temperature >= 0):
    raise ValueError(f"--temperature {f.temperature} is not valid; expected a number >= 0 "
                     "(0 is greedy)")
  if f.top_k is not None and f.top_k < 1:
    raise ValueError(f"--top_k {f.top_k} is not valid; expected >= 1")
  if f.top_p is not None and not 0 < f.top_p <= 1:
    raise ValueError(f"--top_p {f.top_p} is not valid; expected 0 < top_p <= 1")
  common.check_dtype(f.dtype)
  if f.line_width < 0:
    raise ValueError(f"--line_width {f.line_width} is not valid; expected >= 0 (0: one line)")
  if f.logprobs is not None:
    parent = os.path.dirname(os.path.abspath(f.logprobs))
    if os.path.isdir(f.logprobs) or not os.path.isdir(parent):
      raise ValueError(f"--logprobs {f.logprobs!r} is not a writable file path (a directory, "
                       "or its directory does not exist)")


def fasta_sequence(ids) -> tuple[str, int]:
  """Token ids -> a FASTA sequence string (one character per token) and how many tokens were
  written as ``X`` because a FASTA line cannot hold them."""
  ids = [int(t) for t in ids]
  return ("".join(chr(t) if t in FASTA_BYTES else UNPRINTABLE for t in ids),
          sum(t not in FASTA_BYTES for t in ids))


def fasta_record(header: str, sequence: str, width: int) -> str:
  """``>header`` and the sequence in lines of ``width`` characters (0: one line)."""
  step = width or max(len(sequence), 1)
  lines = [sequence[i:i + step] for i in range(0, len(sequence), step)] or [""]
  return "\n".join([f">{header}", *lines]) + "\n"


def _continuation(ids: np.ndarray, stops: list[int]) -> tuple[np.ndarray, bool]:
  """The generated ids up to and including the first stop token, and whether one came."""
  hit = np.flatnonzero(np.isin(ids, stops)) if stops else np.array([], int)
  return (ids[:hit[0] + 1], True) if hit.size else (ids, False)


def run(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  import sh2_jax
  from sh2_jax import checks, tokenizer
  from sh2_jax.data.readers import read_fasta
  try:  # every check of the inputs runs here, before any generation
    check_flags()
    records = read_fasta(FLAGS.fasta) if FLAGS.fasta else [("prompt", FLAGS.prompt.encode())]
    stops = stop_ids(FLAGS.stop)
    model = sh2_jax.load(FLAGS.model, dtype=FLAGS.dtype)
    prompts = [tokenizer.encode(seq) for _, seq in records]
    names = (["--prompt"] if FLAGS.prompt is not None else
             [f"--fasta record {n!r}" for n in common.record_names(records)])
    checks.token_ids([*prompts, stops], [*names, "--stop"], model.cfg.vocab_size)
    longest = max(len(p) for p in prompts)
    checks.length(f"a prompt of {longest} tokens plus --max_new_tokens {FLAGS.max_new_tokens}",
                  longest + FLAGS.max_new_tokens, model.cfg.max_seqlen)
  except (ValueError, OSError) as e:
    fail(str(e))
  want_lp = FLAGS.logprobs is not None
  out = sh2_jax.generate(
      model, prompts, FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
      top_p=FLAGS.top_p, seed=FLAGS.seed, stop_tokens=stops, return_logits=want_lp)
  out, logits = out if want_lp else (out, None)
  out = np.asarray(out)
  settings = (f"model={'_'.join(FLAGS.model.split())} "
              f"temperature={FLAGS.temperature:g} top_k={FLAGS.top_k} top_p={FLAGS.top_p} "
              f"seed={FLAGS.seed}")
  rows = []
  for b, ((name, _), prompt) in enumerate(zip(records, prompts)):
    new, stopped = _continuation(out[b], stops)
    written = new[:-1] if stopped else new
    seq, unprintable = fasta_sequence(np.concatenate([prompt, written]))
    header = (f"{name} prompt_len={len(prompt)} new_tokens={len(written)} "
              f"stopped={'yes' if stopped else 'no'} {settings}")
    if unprintable:
      header += f" unprintable={unprintable}"
    sys.stdout.write(fasta_record(header, seq, FLAGS.line_width))
    if want_lp:
      lp = np.asarray(logits[b, :len(new)], np.float64)
      lp = lp - lp.max(-1, keepdims=True)
      lp = lp[np.arange(len(new)), new] - np.log(np.exp(lp).sum(-1))
      record = (name.split() or [f"record_{b}"])[0]
      rows += [f"{record}\t{i}\t{int(t)}\t{v:.6f}\n" for i, (t, v) in
               enumerate(zip(new, lp))]
  sys.stdout.flush()
  if want_lp:
    with open(FLAGS.logprobs, "w") as f:
      f.write("record\tstep\ttoken\tlogprob\n")
      f.writelines(rows)


def main() -> None:
  """The ``sh2-generate`` command."""
  launch(run, __name__)


if __name__ == "__main__":
  main()
