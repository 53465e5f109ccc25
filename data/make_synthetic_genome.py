"""Write ``sh2_jax/data/corpus/synthetic_genome.fa``: a deterministic, made-up genome for the
default corpus.

Nothing here is real biology data. Each contig mixes what makes DNA learnable at the byte level:
a background from a fixed order-3 Markov chain (GC-rich and AT-rich regions), protein-coding-like
genes (ATG, codons drawn from a skewed usage table, a stop codon), a transposon-like element
copied with a few mutations, microsatellites such as (CAG)n, reverse-complement palindromes, and
short runs of N (assembly gaps). Run ``python data/make_synthetic_genome.py`` to regenerate
(the output is committed, so training needs no step).
"""

from __future__ import annotations

import os

import numpy as np

BASES = np.array(list("ACGT"))
STOPS = ("TAA", "TAG", "TGA")
COMPLEMENT = str.maketrans("ACGTN", "TGCAN")


def markov_background(rng, n: int, table: np.ndarray) -> str:
  out = list(rng.choice(BASES, 3))
  idx = {b: i for i, b in enumerate("ACGT")}
  for _ in range(n - 3):
    ctx = idx[out[-3]] * 16 + idx[out[-2]] * 4 + idx[out[-1]]
    out.append(BASES[rng.choice(4, p=table[ctx])])
  return "".join(out)


def gene(rng, codons: list[str], usage: np.ndarray) -> str:
  n = int(rng.integers(40, 160))
  body = "".join(codons[i] for i in rng.choice(len(codons), n, p=usage))
  return "ATG" + body + STOPS[int(rng.integers(3))]


def mutate(rng, seq: str, rate: float) -> str:
  s = list(seq)
  for i in np.nonzero(rng.random(len(s)) < rate)[0]:
    s[i] = BASES[rng.integers(4)]
  return "".join(s)


def contig(rng, length: int, tables, codons, usage, transposon) -> str:
  parts, total = [], 0
  while total < length:
    kind = rng.choice(["bg", "gene", "te", "micro", "palin", "gap"],
                      p=[0.40, 0.30, 0.10, 0.10, 0.07, 0.03])
    if kind == "bg":
      s = markov_background(rng, int(rng.integers(100, 600)), tables[int(rng.integers(2))])
    elif kind == "gene":
      s = gene(rng, codons, usage)
    elif kind == "te":
      s = mutate(rng, transposon, 0.02)
    elif kind == "micro":
      s = ["CAG", "AT", "GGC", "TTAGGG"][int(rng.integers(4))] * int(rng.integers(5, 25))
    elif kind == "palin":
      half = "".join(rng.choice(BASES, int(rng.integers(6, 16))))
      s = half + "".join(rng.choice(BASES, 4)) + half.translate(COMPLEMENT)[::-1]
    else:
      s = "N" * int(rng.integers(10, 60))
    parts.append(s)
    total += len(s)
  return "".join(parts)[:length]


def main(path: str, seed: int = 7, num_contigs: int = 12, contig_len: int = 9000) -> None:
  rng = np.random.default_rng(seed)
  tables = []
  for concentration, gc in ((0.6, 0.62), (0.6, 0.36)):
    base = np.array([(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2])
    tables.append(rng.dirichlet(base * concentration * 2, size=64))
  codons = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT"
            if a + b + c not in STOPS]
  usage = rng.dirichlet(np.full(len(codons), 0.4))
  transposon = "".join(rng.choice(BASES, 300))
  with open(path, "w") as f:
    for i in range(num_contigs):
      seq = contig(rng, contig_len, tables, codons, usage, transposon)
      f.write(f">synthetic_contig_{i + 1} length={len(seq)} made-up sequence, not real data\n")
      for j in range(0, len(seq), 60):
        f.write(seq[j:j + 60] + "\n")


if __name__ == "__main__":
  main(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sh2_jax", "data",
                   "corpus", "synthetic_genome.fa"))
