"""sh2-score: log-likelihoods of the records of a FASTA file, or variant effects from a table
or VCF against a FASTA reference.

  sh2-score --model CKPT_OR_NAME --fasta seqs.fa --out scores.tsv [--batch_size 8]
            [--reduce mean|sum|none] [--rc]
  sh2-score --model CKPT_OR_NAME --variants variants.tsv|calls.vcf --reference ref.fa
            --out deltas.tsv [--window 8192] [--label_column label] [--rc]

``--fasta``: one row per record, ``name  length  score`` (the mean or sum per-token
log-likelihood, natural log); ``--reduce none``: one row per scored token,
``name  position  token  loglik`` (position 1-based, from 2: the first token has no
prediction). ``--rc`` averages each score with the reverse complement's (DNA only).
``--variants``: rows of chrom, 1-based pos, ref, alt [, label] (see
``sh2_jax.inference.variants``); writes ``chrom pos ref alt [label] ref_score alt_score
delta`` and, with labels, prints the AUROC of ``-delta``. Every input is checked before the
model is loaded, and the output is written only once everything is scored. A progress bar
goes to stderr.
"""

from __future__ import annotations

import sys

from absl import flags

from sh2_jax.cli import common
from sh2_jax.cli.launch import fail, launch

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined when it runs, not on import)."""
  flags.DEFINE_string("model", None, "checkpoint directory (ours or a converted Evo 2) or a "
                      "model name")
  flags.DEFINE_string("fasta", None, "FASTA file (optionally gzipped): score every record")
  flags.DEFINE_string("variants", None, "variants table (.tsv: chrom pos ref alt [label]) or "
                      "VCF (.vcf, .vcf.gz): score each variant's effect")
  flags.DEFINE_string("reference", None, "FASTA reference the --variants positions refer to "
                      "(read by random access through a .fai index)")
  flags.DEFINE_string("out", None, "output table (tab-separated)")
  flags.DEFINE_integer("batch_size", 8, "sequences (or windows) per forward pass")
  flags.DEFINE_enum("reduce", "mean", ["mean", "sum", "none"], "per-sequence score: the mean or "
                    "sum of the per-token log-likelihoods, or none (every token; --fasta only)")
  flags.DEFINE_bool("rc", False, "average each score with its reverse complement's (DNA)")
  flags.DEFINE_integer("window", None, "bases around each variant (default 8192, Evo 2's, "
                       "capped at the model's max_seqlen)")
  flags.DEFINE_string("label_column", "label", "column (table) or INFO key (VCF) holding 0/1 "
                      "labels; when present the AUROC of -delta is printed")
  flags.DEFINE_integer("segment_len", None, "score each batch in segments of this many tokens "
                       "(bounds memory for long sequences)")
  flags.DEFINE_string("dtype", None, "compute dtype, e.g. bfloat16 (default: the checkpoint's)")


def check_flags() -> None:
  """Every flag value, before any file is read (errors name the value and what is valid)."""
  f = FLAGS
  if f.model is None:
    raise ValueError("--model is required (a checkpoint directory or a model name)")
  if (f.fasta is None) == (f.variants is None):
    raise ValueError("give exactly one of --fasta (score sequences) or --variants (variant "
                     "effects)")
  if f.fasta is not None:
    common.check_input_file("fasta", f.fasta)
    if f.reference is not None:
      raise ValueError("--reference goes with --variants, not --fasta")
  else:
    common.check_input_file("variants", f.variants)
    if f.reference is None:
      raise ValueError("--variants needs --reference (the FASTA the positions refer to)")
    common.check_input_file("reference", f.reference)
    if f.reduce == "none":
      raise ValueError("--reduce none is not valid with --variants; expected mean or sum")
  if f.rc and f.reduce == "none":
    raise ValueError("--rc averages whole-sequence scores; use --reduce mean or sum with it")
  common.check_output_file("out", f.out)
  common.check_positive("batch_size", f.batch_size, allow_none=False)
  common.check_positive("segment_len", f.segment_len)
  if f.window is not None and f.window < 2:
    raise ValueError(f"--window {f.window} is not valid; expected >= 2")
  common.check_dtype(f.dtype)


def score_fasta(model, records) -> None:
  from sh2_jax.inference.scoring import sequence_scores
  f = FLAGS
  names = common.record_names(records)
  seqs = [seq for _, seq in records]
  scores = sequence_scores(model, seqs, f.reduce, rc=f.rc, batch_size=f.batch_size,
                           segment_len=f.segment_len, progress=True)
  if f.reduce == "none":
    head = "name\tposition\ttoken\tloglik\n"
    rows = (f"{name}\t{j + 2}\t{chr(seq[j + 1]) if 32 < seq[j + 1] < 127 else seq[j + 1]}"
            f"\t{ll:.8g}\n"
            for name, seq, lls in zip(names, seqs, scores) for j, ll in enumerate(lls))
  else:
    head = f"name\tlength\t{f.reduce}_loglik{'_rc_avg' if f.rc else ''}\n"
    rows = (f"{name}\t{len(seq)}\t{s:.8g}\n" for name, seq, s in zip(names, seqs, scores))
  common.write_text(f.out, [head, *rows])
  print(f"scored {len(seqs)} sequence(s); wrote {f.out}")


def score_variant_table(model, variants, reference) -> None:
  from sh2_jax.inference import variants as var
  f = FLAGS
  result = var.score_variants(model, variants, reference, f.window, reduce=f.reduce, rc=f.rc,
                              batch_size=f.batch_size, segment_len=f.segment_len,
                              progress=True)
  common.write_text(f.out, [var.delta_table(variants, result)])
  print(f"scored {len(variants)} variant(s); wrote {f.out}")
  labels = [v.label for v in variants]
  if all(label is not None for label in labels):
    n_pos = sum(labels)
    if 0 < n_pos < len(labels):
      print(f"AUROC {var.auroc(-result['delta'], labels):.4f} (label 1 ranked by -delta; "
            f"{n_pos} positive, {len(labels) - n_pos} negative)")
    else:
      print(f"AUROC undefined: every label is {labels[0]}")


def _run(argv) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  import sh2_jax
  try:  # every check of the inputs runs here, before any scoring or writing
    check_flags()
    if FLAGS.fasta is not None:
      from sh2_jax.data.readers import read_fasta
      records = [(n.split()[0], q) for n, q in read_fasta(FLAGS.fasta)]
    else:
      from sh2_jax.inference import variants as var
      variants = var.read_variants(FLAGS.variants, FLAGS.label_column)
      reference = var.Reference(FLAGS.reference)
      var.check_reference(variants, reference)
    model = sh2_jax.load(FLAGS.model, dtype=FLAGS.dtype)
    if FLAGS.fasta is not None:
      from sh2_jax import checks, tokenizer
      names = [f"--fasta record {n!r}" for n in common.record_names(records)]
      for name, (_, seq) in zip(names, records):
        if len(seq) < 2:
          raise ValueError(f"{name} has {len(seq)} token(s); scoring needs at least 2")
        checks.length(f"{name} of {len(seq)} tokens", len(seq), model.cfg.max_seqlen)
      checks.token_ids([tokenizer.encode(s) for _, s in records], names, model.cfg.vocab_size)
      if FLAGS.rc:
        from sh2_jax.inference.scoring import reverse_complement
        for name, (_, seq) in zip(common.record_names(records), records):
          reverse_complement(tokenizer.encode(seq), f"--fasta record {name!r}")
    elif FLAGS.window is not None and FLAGS.window > model.cfg.max_seqlen:
      raise ValueError(f"--window {FLAGS.window} is more than the model's max_seqlen "
                       f"{model.cfg.max_seqlen}")
  except (ValueError, OSError) as e:
    fail(str(e))
  if FLAGS.fasta is not None:
    score_fasta(model, records)
  else:
    score_variant_table(model, variants, reference)
  sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
  """The ``sh2-score`` command; ``argv`` is the full command line (default ``sys.argv``)."""
  define_flags()
  launch(_run, __name__, argv=argv)


if __name__ == "__main__":
  main()
