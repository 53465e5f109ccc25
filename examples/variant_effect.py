"""Variant effects, the Evo 2 way, on the shipped example data: ten single-base variants of a
synthetic gene (``examples/data/variants.tsv``: start- and stop-codon losses, a premature
stop, labelled 1; a synonymous change and changes outside the gene, labelled 0).

  python examples/variant_effect.py                      # tiny model with RANDOM weights
  python examples/variant_effect.py --model=ckpt/evo2_7b_base --window=8192

The same through the command line, on any table or VCF and reference:

  sh2-score --model=ckpt/evo2_7b_base --variants=examples/data/variants.tsv \\
      --reference=examples/data/synthetic_gene.fa --out=deltas.tsv

``--model`` is an sh2_jax checkpoint directory (ours, or converted from Evo 2 with
``sh2-convert``), a released model's name (its weights), or ``random:NAME``; with random
weights the deltas only show the workflow, not biology, and the output says so.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sh2_jax  # noqa: E402
from sh2_jax.inference import variants as var  # noqa: E402
from sh2_jax.presets import RELEASES  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
flags.DEFINE_string("model", "tiny", "checkpoint directory or model name")
flags.DEFINE_string("variants", os.path.join(DATA, "variants.tsv"), "variants table or VCF")
flags.DEFINE_string("reference", os.path.join(DATA, "synthetic_gene.fa"), "FASTA reference")
flags.DEFINE_integer("window", 256, "bases around each variant (Evo 2 used 8192)")
flags.DEFINE_string("dtype", None, "compute dtype, e.g. bfloat16 on GPU")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    variants = var.read_variants(FLAGS.variants)
    reference = var.Reference(FLAGS.reference)
    var.check_reference(variants, reference)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  random_weights = not os.path.isdir(FLAGS.model) and FLAGS.model not in RELEASES
  model = sh2_jax.load(FLAGS.model, dtype=FLAGS.dtype)
  print(f"model: {FLAGS.model}" + ("  [RANDOM WEIGHTS: deltas illustrate the workflow only]"
                                   if random_weights else ""))
  result = var.score_variants(model, variants, reference, FLAGS.window, batch_size=8)
  print(f"{'variant':>24} {'label':>5} {'ref LL':>10} {'alt LL':>10} {'delta':>10}")
  for v, r, a, d in zip(variants, result["ref"], result["alt"], result["delta"]):
    print(f"{str(v):>24} {'' if v.label is None else v.label:>5} {r:>10.5f} {a:>10.5f} "
          f"{d:>+10.5f}")
  labels = [v.label for v in variants]
  if None not in labels and 0 < sum(labels) < len(labels):
    print(f"AUROC of -delta for label 1: {var.auroc(-np.asarray(result['delta']), labels):.3f}")


if __name__ == "__main__":
  app.run(main)
