"""Generate DNA (or any bytes) from a checkpoint or a preset.

  python generate.py --model evo2_7b_base --prompt ACGTACGT --max_new_tokens 64
  python generate.py --model CKPT_DIR --fasta prompts.fa --temperature 0.7 --top_k 4

A FASTA file's records run as one batch (prompts of different lengths are fine). ``--model`` is
anything ``sh2_jax.load`` takes: a checkpoint directory, a released model's name (its weights,
from the local cache or the Hugging Face hub), or ``random:NAME`` for random weights (to try the
pipeline, not for biology; ``tiny`` has no released weights and is always random).
"""

from __future__ import annotations

import math
import sys

from absl import app, flags

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
DTYPES = ("float32", "bfloat16")


def read_fasta(path: str) -> list[tuple[str, str]]:
  """(name, sequence) records of a FASTA file; sequence lines are concatenated."""
  records: list[tuple[str, list[str]]] = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if line.startswith(">"):
        records.append((line[1:].strip(), []))
      elif not records:
        raise ValueError(f"{path}:{line_no}: sequence before the first '>' header")
      else:
        records[-1][1].append(line)
  if not records:
    raise ValueError(f"{path} holds no FASTA records")
  empty = [name for name, seq in records if not seq]
  if empty:
    raise ValueError(f"{path}: record(s) {empty} have no sequence")
  return [(name, "".join(seq)) for name, seq in records]


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
  if f.dtype is not None and f.dtype not in DTYPES:
    raise ValueError(f"--dtype {f.dtype!r} is not valid; expected one of {', '.join(DTYPES)}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  import sh2_jax
  from sh2_jax import tokenizer
  try:  # every check of the inputs runs here, before any generation
    check_flags()
    try:
      records = read_fasta(FLAGS.fasta) if FLAGS.fasta else [("prompt", FLAGS.prompt)]
    except UnicodeDecodeError:
      raise ValueError(f"--fasta {FLAGS.fasta!r} is not a text FASTA file") from None
    stops = stop_ids(FLAGS.stop)
    model = sh2_jax.load(FLAGS.model, dtype=FLAGS.dtype)
    prompts = [tokenizer.encode(seq) for _, seq in records]
    longest = max(len(p) for p in prompts)
    if longest + FLAGS.max_new_tokens > model.cfg.max_seqlen:
      raise ValueError(f"a prompt of {longest} tokens plus --max_new_tokens "
                       f"{FLAGS.max_new_tokens} exceeds the model's max_seqlen "
                       f"{model.cfg.max_seqlen}")
  except (ValueError, OSError) as e:
    _fail(str(e))
  out = sh2_jax.generate(
      model, prompts, FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
      top_p=FLAGS.top_p, seed=FLAGS.seed, stop_tokens=stops)
  for (name, seq), ids in zip(records, out):
    print(f">{name}\n{seq}|{tokenizer.decode_str(ids)}")
  sys.stdout.flush()


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except flags.Error as e:  # absl's messages name the flag and the bad value
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
