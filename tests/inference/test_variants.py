"""Variant effects from a table or VCF: rows read and checked against an indexed reference,
windows scored in batches equal to windows built by hand, AUROC from ranks, and the
``sh2-score --variants`` command (one error line, exit 2, nothing written on bad rows)."""

from __future__ import annotations

import concurrent.futures
import gzip
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from sh2_jax.inference import variants as var
from sh2_jax.inference.scoring import sequence_scores

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "examples", "data")
CHR1 = "ACGTTGCAAGTCCGATAGCTAGGCTTACGATCGGATCCGATTACGAGCTAGCATCGATCGACTGACTG"  # 68 bases
CHR2 = "ggatcNNacgTTAGC"


@pytest.fixture()
def reference(tmp_path):
  path = tmp_path / "ref.fa"  # 60-base lines, as samtools faidx requires
  path.write_text(f">chr1 the first\n{CHR1[:60]}\n{CHR1[60:]}\n>chr2\n{CHR2}\n")
  return var.Reference(str(path))


def _table(tmp_path, rows, header="chrom\tpos\tref\talt\tlabel"):
  path = tmp_path / "v.tsv"
  path.write_text(header + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
  return str(path)


def test_table_and_vcf_read_the_same_variants():
  table = var.read_variants(os.path.join(DATA, "variants.tsv"))
  vcf = var.read_variants(os.path.join(DATA, "variants.vcf"))
  assert [(v.chrom, v.pos, v.ref, v.alt, v.label) for v in table] == \
      [(v.chrom, v.pos, v.ref, v.alt, v.label) for v in vcf]
  assert table[0] == var.Variant(f"{DATA}/variants.tsv line 2", "synthetic_gene", 201, "A",
                                 "C", 1)
  var.check_reference(table, var.Reference(os.path.join(DATA, "synthetic_gene.fa")))


def test_vcf_multiallelic_and_unlabelled(tmp_path):
  path = tmp_path / "calls.vcf"
  path.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                  "chr1\t3\t.\tg\tA,T\t.\tPASS\tDP=3\n")
  got = var.read_variants(str(path))
  assert [(v.pos, v.ref, v.alt, v.label) for v in got] == [(3, "G", "A", None),
                                                         (3, "G", "T", None)]
  packed = tmp_path / "calls.vcf.gz"
  packed.write_bytes(gzip.compress(path.read_bytes()))
  assert [(v.pos, v.alt) for v in var.read_variants(str(packed))] == [(3, "A"), (3, "T")]
  path.write_text(path.read_text() + "chr1\t5\t.\tC\tA\t.\tPASS\tlabel=1\n")
  with pytest.raises(ValueError, match="line 3: no INFO key 'label', which other rows have"):
    var.read_variants(str(path))


@pytest.mark.parametrize("row,message", [
    (("chr1", 3, "G", "N", 1), r"line 2: alt allele 'N' is not a single base; expected one of "
                                "A, C, G, T"),
    (("chr1", 3, "GA", "T", 1), "line 2: ref allele 'GA' is not a single base"),
    (("chr1", 3, "G", "g", 1), "line 2: alt 'G' equals ref"),
    (("chr1", 0, "G", "T", 1), "line 2: position 0 is not valid; positions are 1-based"),
    (("chr1", "x", "G", "T", 1), "line 2: position 'x' is not an integer"),
    (("chr1", 3, "G", "T", "LOF"), "line 2: label 'LOF' is not 0/1"),
])
def test_bad_rows(tmp_path, row, message):
  with pytest.raises(ValueError, match=message):
    var.read_variants(_table(tmp_path, [row]))


def test_reference_checks(tmp_path, reference):
  assert reference.names == ["chr1", "chr2"] and reference.length("chr1") == 68
  assert reference.fetch("chr1", 58, 62) == CHR1[58:62] and reference.fetch("chr2", 0, 3) == "GGA"
  for row, message in [
      (("chr1", 3, "T", "A", 1), r"line 2 \(chr1:3 T>A\): the reference has 'G' at chr1:3, "
                                  "not the row's ref 'T'"),
      (("chrX", 3, "G", "A", 1), "chromosome 'chrX' is not in the reference .*; it has chr1, "
                                  "chr2"),
      (("chr2", 16, "G", "A", 1), r"position 16 is past the end of chr2 \(1..15\)"),
  ]:
    with pytest.raises(ValueError, match=message):
      var.check_reference(var.read_variants(_table(tmp_path, [row])), reference)
  with pytest.raises(ValueError, match="alt 'X' is not a single DNA base"):
    var.mutate("ACGT", 1, "X")
  gz = tmp_path / "ref.fa.gz"
  gz.write_bytes(gzip.compress(f">chr1\n{CHR1}\n".encode()))
  ragged = tmp_path / "ragged.fa"
  ragged.write_text(">chr1\nACGT\nACGTTT\nAC\n")
  for path, message in [(gz, "is gzip-compressed; random access needs a plain FASTA"),
                        (ragged, "cannot be read as an indexed FASTA: Line length"),
                        (tmp_path / "none.fa", "does not exist")]:
    with pytest.raises(ValueError, match=message):
      var.Reference(str(path))


def test_window_bounds():
  assert var.window_bounds(30, 10, 68) == (25, 35)  # centred
  assert var.window_bounds(2, 10, 68) == (0, 10)    # shifted inward at the start
  assert var.window_bounds(66, 10, 68) == (58, 68)  # and at the end
  assert var.window_bounds(5, 100, 15) == (0, 15)   # a chromosome shorter than the window


def test_deltas_equal_windows_scored_by_hand(tmp_path, model, reference):
  rows = [("chr1", 31, CHR1[30], "A" if CHR1[30] != "A" else "C", 1),
          ("chr1", 31, CHR1[30], "T" if CHR1[30] != "T" else "C", 0),  # shares the ref window
          ("chr1", 2, CHR1[1], "T" if CHR1[1] != "T" else "A", 1),
          ("chr2", 12, "T", "C", 0)]
  variants = var.read_variants(_table(tmp_path, rows))
  got = var.score_variants(model, variants, reference, 20, batch_size=3)
  seqs = {"chr1": CHR1, "chr2": CHR2.upper()}
  for v, d, r in zip(variants, got["delta"], got["ref"]):
    start, end = var.window_bounds(v.pos - 1, 20, len(seqs[v.chrom]))
    ref_w = seqs[v.chrom][start:end]
    alt_w = ref_w[:v.pos - 1 - start] + v.alt + ref_w[v.pos - start:]
    ref_s, alt_s = sequence_scores(model, [ref_w, alt_w])
    np.testing.assert_allclose([r, d], [ref_s, alt_s - ref_s], rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(got["delta"]) > 0)
  chunked = var.score_variants(model, variants, reference, 20, batch_size=2, chunk_size=3)
  np.testing.assert_allclose(chunked["delta"], got["delta"], rtol=1e-5, atol=1e-7)
  rc = var.score_variants(model, variants, reference, 20, batch_size=3, rc=True)
  assert not np.allclose(rc["delta"], got["delta"])
  with pytest.raises(ValueError, match="window 300 is not valid; expected 2..256"):
    var.score_variants(model, variants, reference, 300)
  iupac = tmp_path / "iupac.fa"
  iupac.write_text(">chr1\nACGTRACGTA\n")
  with pytest.raises(ValueError, match=r"line 2 \(chr1:2 C>T\): the window chr1:1-10 has 'R' "
                                       "at position 5; reverse-complement averaging needs DNA"):
    var.score_variants(model, var.read_variants(_table(tmp_path, [("chr1", 2, "C", "T", 0)])),
                       var.Reference(str(iupac)), 16, rc=True)


def test_auroc_known_cases():
  assert var.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
  assert var.auroc([1, 1, 2], [0, 1, 1]) == 0.75  # a tie counts half
  assert var.auroc([3, 2, 1], [1, 0, 0]) == 1.0 and var.auroc([3, 2, 1], [0, 1, 1]) == 0.0
  rng = np.random.default_rng(0)
  scores, labels = rng.integers(0, 5, 40).astype(float), rng.integers(0, 2, 40)
  pairs = [(s > t) + 0.5 * (s == t) for (s, a), (t, b)
           in itertools.product(zip(scores, labels), repeat=2) if a == 1 and b == 0]
  assert var.auroc(scores, labels) == pytest.approx(np.mean(pairs))
  with pytest.raises(ValueError, match="AUROC needs both classes; got 2 positive and 0"):
    var.auroc([1, 2], [1, 1])


# ------------------------------------------------------------------- sh2-score --variants
def _score_cli(args):
  return subprocess.run([sys.executable, "-m", "sh2_jax.cli.score", *args], capture_output=True,
                        text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
  from sh2_jax.checkpoint import save_model
  path = str(tmp_path_factory.mktemp("variants") / "ckpt")
  save_model(path, model)
  return path


def test_variants_command_on_the_shipped_data(tmp_path, model, checkpoint):
  out = tmp_path / "deltas.tsv"
  r = _score_cli([f"--model={checkpoint}", f"--variants={DATA}/variants.vcf",
                  f"--reference={DATA}/synthetic_gene.fa", f"--out={out}", "--window=64",
                  "--batch_size=4"])
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [line.split("\t") for line in out.read_text().splitlines()]
  assert rows[0] == ["chrom", "pos", "ref", "alt", "label", "ref_score", "alt_score", "delta"]
  assert rows[1][:5] == ["synthetic_gene", "201", "A", "C", "1"] and len(rows) == 11
  variants = var.read_variants(f"{DATA}/variants.vcf")
  want = var.score_variants(model, variants, var.Reference(f"{DATA}/synthetic_gene.fa"), 64)
  delta = np.array([float(row[7]) for row in rows[1:]])
  np.testing.assert_allclose(delta, want["delta"], rtol=1e-4, atol=1e-7)
  auc = var.auroc(-delta, [v.label for v in variants])
  assert f"AUROC {auc:.4f} (label 1 ranked by -delta; 5 positive, 5 negative)" in r.stdout


def test_variants_command_bad_rows(tmp_path, checkpoint):
  fa = tmp_path / "ref.fa"
  fa.write_text(f">chr1\n{CHR1}\n")
  out = tmp_path / "deltas.tsv"
  mismatch = tmp_path / "mismatch.tsv"
  mismatch.write_text("chrom\tpos\tref\talt\nchr1\t1\tA\tC\nchr1\t3\tT\tA\n")
  bad_alt = tmp_path / "alt.tsv"
  bad_alt.write_text("chrom\tpos\tref\talt\nchr1\t3\tG\tR\n")
  good = tmp_path / "good.tsv"
  good.write_text("chrom\tpos\tref\talt\nchr1\t3\tG\tA\n")
  common = [f"--model={checkpoint}", f"--reference={fa}", f"--out={out}"]
  cases = [
      ([*common, f"--variants={mismatch}"],
       f"{mismatch} line 3 (chr1:3 T>A): the reference has 'G' at chr1:3, not the row's ref 'T'"),
      ([*common, f"--variants={bad_alt}"], "line 2: alt allele 'R' is not a single base"),
      ([*common, f"--variants={mismatch}", "--reduce=none"], "--reduce none is not valid"),
      ([f"--model={checkpoint}", f"--variants={mismatch}", f"--out={out}"], "needs --reference"),
      ([*common, f"--variants={good}", "--window=1000"], "--window 1000 is more than"),
  ]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(_score_cli, [args for args, _ in cases]))
  for (args, message), r in zip(cases, results):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (args, r.stderr[-1500:])
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], (args, lines[-2:])
    assert lines[-1] == errors[0] and "Traceback" not in r.stderr, args
    assert not out.exists(), args
