"""Generate DNA (or any bytes) from a checkpoint or a preset.

  python generate.py --model CKPT_DIR_OR_PRESET --prompt ACGTACGT --max_new_tokens 64
  python generate.py --model CKPT_DIR --fasta prompts.fa --temperature 0.7 --top_k 4

A FASTA file's records run as one batch (prompts of different lengths are fine). A preset name
builds that architecture with random weights (useful to try the pipeline, not for biology).
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "checkpoint directory (ours or a converted Evo 2) or preset")
flags.DEFINE_string("prompt", None, "prompt string")
flags.DEFINE_string("fasta", None, "FASTA file: every record is one prompt")
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt")
flags.DEFINE_float("temperature", 0.0, "0 is greedy")
flags.DEFINE_integer("top_k", None, "sample among the k most likely tokens")
flags.DEFINE_float("top_p", None, "nucleus sampling mass")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_list("stop", [], "stop strings of one character each (e.g. '>'), or token ids")
flags.DEFINE_string("dtype", None, "compute dtype, e.g. bfloat16 (default: the checkpoint's)")


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


def main(argv):
  del argv
  import sh2_jax
  from sh2_jax import tokenizer
  if FLAGS.model is None:
    raise app.UsageError("--model is required (a checkpoint directory or a preset name)")
  if (FLAGS.prompt is None) == (FLAGS.fasta is None):
    raise app.UsageError("give exactly one of --prompt or --fasta")
  records = read_fasta(FLAGS.fasta) if FLAGS.fasta else [("prompt", FLAGS.prompt)]
  model = sh2_jax.load(FLAGS.model, dtype=FLAGS.dtype)
  out = sh2_jax.generate(
      model, [tokenizer.encode(seq) for _, seq in records], FLAGS.max_new_tokens,
      temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
      stop_tokens=stop_ids(FLAGS.stop))
  for (name, seq), ids in zip(records, out):
    print(f">{name}\n{seq}|{tokenizer.decode_str(ids)}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
