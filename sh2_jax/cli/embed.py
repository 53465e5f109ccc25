"""sh2-embed: activations of the records of a FASTA file at named layers, into one .npz.

  sh2-embed --model CKPT_OR_NAME --fasta seqs.fa --layers blocks.28.mlp.l3[,blocks.10.filter]
            --out emb.npz [--pool mean|none] [--segment_len S] [--batch_size 8]

Layers are named by the reference checkpoint's module paths (``embedding_layer``,
``blocks.N``, ``blocks.N.mlp.l3``, ``blocks.N.filter``, ``norm`` ...). The .npz holds
``names`` (the record names, [N]) and ``lengths`` ([N] tokens), and per layer:
  --pool mean   ``<layer>``: [N, D] float32, each record's mean over its own tokens;
  --pool none   ``<layer>/<i>``: [L_i, D] float32 for record i (0-based, as in ``names``).
``--segment_len`` runs the segmented forward (segments of S tokens carrying the recurrent
state): long records in the memory of S tokens, same activations. Every input (files, layer
names, lengths) is checked before anything is computed; the file is written at the end.
"""

from __future__ import annotations

import sys

from absl import flags

from sh2_jax import files
from sh2_jax.cli import common
from sh2_jax.cli.launch import fail, launch

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined when it runs, not on import)."""
  flags.DEFINE_string("model", None, "checkpoint directory (ours or a converted Evo 2) or a "
                      "model name")
  flags.DEFINE_string("fasta", None, "FASTA file (optionally gzipped): embed every record")
  flags.DEFINE_list("layers", None, "comma-separated module paths, e.g. blocks.28.mlp.l3")
  flags.DEFINE_string("out", None, "output .npz file")
  flags.DEFINE_enum("pool", "mean", ["mean", "none"], "mean over each record's tokens, or none "
                    "(one [L, D] array per record and layer)")
  flags.DEFINE_integer("segment_len", None, "run the segmented forward in segments of this many "
                       "tokens (long records)")
  flags.DEFINE_integer("batch_size", 8, "records per forward pass")
  flags.DEFINE_string("dtype", None, "compute dtype, e.g. bfloat16 (default: the checkpoint's)")


def check_flags() -> None:
  """Every flag value, before any file is read (errors name the value and what is valid)."""
  f = FLAGS
  if f.model is None:
    raise ValueError("--model is required (a checkpoint directory or a model name)")
  common.check_input_file("fasta", f.fasta)
  if not f.layers or not all(f.layers):
    raise ValueError(f"--layers {','.join(f.layers or [])!r} is not valid; give one or more "
                     "comma-separated module paths, e.g. blocks.0.mlp.l3")
  dup = sorted({n for n in f.layers if f.layers.count(n) > 1})
  if dup:
    raise ValueError(f"--layers names {dup} more than once")
  common.check_output_file("out", f.out, suffix=".npz")
  common.check_positive("batch_size", f.batch_size, allow_none=False)
  common.check_positive("segment_len", f.segment_len)
  common.check_dtype(f.dtype)


def _run(argv) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  import numpy as np

  import sh2_jax
  from sh2_jax.data.readers import read_fasta
  from sh2_jax.embed import check_layer_names, embed_sequences
  f = FLAGS
  try:  # every check of the inputs runs here, before any forward pass or writing
    check_flags()
    records = [(n.split()[0], q) for n, q in read_fasta(f.fasta)]
    names = common.record_names(records)
    model = sh2_jax.load(f.model, dtype=f.dtype)
    check_layer_names(model, f.layers)
    from sh2_jax import checks, tokenizer
    labels = [f"--fasta record {n!r}" for n in names]
    for label, (_, seq) in zip(labels, records):
      checks.length(f"{label} of {len(seq)} tokens", len(seq), model.cfg.max_seqlen)
    checks.token_ids([tokenizer.encode(s) for _, s in records], labels, model.cfg.vocab_size)
  except (ValueError, OSError) as e:
    fail(str(e))
  try:
    acts = embed_sequences(model, [s for _, s in records], f.layers, pool=f.pool,
                           batch_size=f.batch_size, segment_len=f.segment_len, progress=True)
  except ValueError as e:  # e.g. a parameter container named as a layer: it records nothing
    fail(str(e))
  arrays = {"names": np.array(names), "lengths": np.array([len(s) for _, s in records])}
  for layer, a in acts.items():
    if f.pool == "mean":
      arrays[layer] = a
    else:
      arrays.update({f"{layer}/{i}": x for i, x in enumerate(a)})
  files.write_atomic(f.out, lambda tmp: np.savez(tmp, **arrays))
  print(f"embedded {len(records)} record(s) at {len(f.layers)} layer(s); wrote {f.out}")
  sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
  """The ``sh2-embed`` command; ``argv`` is the full command line (default ``sys.argv``)."""
  define_flags()
  launch(_run, __name__, argv=argv)


if __name__ == "__main__":
  main()
