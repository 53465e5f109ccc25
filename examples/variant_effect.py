"""Variant-effect scoring, the Evo 2 way: score a window around each single-base variant with
the reference base and with the alternative, and report the change in log-likelihood.

  python examples/variant_effect.py --model=evo2_7b_base --fasta=my_gene.fa --window=8192
  python examples/variant_effect.py            # the shipped synthetic gene, tiny random model

``--model`` is what ``sh2_jax.load`` takes: an sh2_jax checkpoint directory, a released model's
name (its weights), or a preset without weights (``tiny``, ``random:NAME``): RANDOM weights, and
the output says so: its deltas only show the workflow, not biology.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sh2_jax  # noqa: E402
from sh2_jax.data.readers import parse_fasta  # noqa: E402
from sh2_jax.inference.scoring import mutate  # noqa: E402
from sh2_jax.presets import RELEASES  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
flags.DEFINE_string("model", "tiny", "checkpoint directory or preset name")
flags.DEFINE_string("fasta", os.path.join(HERE, "data", "synthetic_gene.fa"), "FASTA file (first record)")
flags.DEFINE_integer("window", 256, "tokens of context around each variant (Evo 2 used 8192)")
flags.DEFINE_list("variants", ["210:A", "215:A", "400:G", "700:G", "1100:C"],
                  "0-based position:alt base pairs")
flags.DEFINE_string("dtype", None, "compute dtype, e.g. bfloat16 on GPU")
FLAGS = flags.FLAGS


def windows(seq: bytes, pos: int, alt: str, width: int) -> tuple[bytes, bytes]:
  """(reference, mutated) windows of ``width`` bases containing ``pos`` (centred when possible)."""
  start = min(max(0, pos - width // 2), max(0, len(seq) - width))
  ref = seq[start:start + width]
  return ref, mutate(ref, pos - start, alt)


def main(argv):
  del argv
  with open(FLAGS.fasta, "rb") as f:
    records = parse_fasta(f.read(), upper=True)
  if not records:
    sys.exit(f"error: {FLAGS.fasta!r} holds no FASTA sequence")
  seq = records[0]
  random_weights = not os.path.isdir(FLAGS.model) and FLAGS.model not in RELEASES
  model = sh2_jax.load(FLAGS.model, dtype=FLAGS.dtype)
  print(f"model: {FLAGS.model}" + ("  [RANDOM WEIGHTS: deltas illustrate the workflow only]"
                                   if random_weights else ""))
  print(f"sequence: {len(seq)} bp from {os.path.basename(FLAGS.fasta)}; window {FLAGS.window}")
  print(f"{'variant':>10} {'ref':>4} {'alt':>4} {'ref LL':>10} {'alt LL':>10} {'delta':>10}")
  for item in FLAGS.variants:
    try:
      pos_s, alt = item.split(":")
      pos = int(pos_s)
    except ValueError:
      sys.exit(f"error: variant {item!r} is not position:base (e.g. 210:T)")
    if not 0 <= pos < len(seq):
      sys.exit(f"error: variant position {pos} is outside the sequence 0..{len(seq) - 1}")
    if alt.upper().encode() == seq[pos:pos + 1]:
      sys.exit(f"error: variant {item!r}: {alt!r} is already the reference base at {pos}")
    ref_w, alt_w = windows(seq, pos, alt.upper(), FLAGS.window)
    ll_ref, ll_alt = (float(np.mean(x)) for x in sh2_jax.score(model, [
        np.frombuffer(ref_w, np.uint8).astype(np.int32),
        np.frombuffer(alt_w, np.uint8).astype(np.int32)]))
    print(f"{pos:>10} {chr(seq[pos]):>4} {alt:>4} {ll_ref:>10.5f} {ll_alt:>10.5f} "
          f"{ll_alt - ll_ref:>+10.5f}")


if __name__ == "__main__":
  app.run(main)
