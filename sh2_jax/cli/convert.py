"""Convert a reference (vortex / Evo 2) checkpoint into an sh2_jax Orbax checkpoint
(``sh2-convert``; also ``python -m sh2_jax.convert``).

  sh2-convert --checkpoint evo2_7b_base.pt --config evo2_7b_base --output DIR
  sh2-convert --checkpoint evo2_7b.pt --config evo2-7b-1m.yml --output DIR

``--config`` is the model's name (the preset with the shapes of the reference config that name
is paired with) or a vortex YAML file. ``--checkpoint`` may name a file cut into ``.partN`` shards. Nothing is written unless the whole
checkpoint converts; Orbax writes DIR atomically.
"""

from __future__ import annotations

import jax
from absl import flags
from flax import nnx

from sh2_jax.checkpoint import save_model
from sh2_jax.cli import common
from sh2_jax.cli.launch import fail, launch
from sh2_jax.convert.vortex import from_vortex

flags.DEFINE_string("checkpoint", None, "reference .pt state dict (or its .partN shards)")
flags.DEFINE_string("config", None, "the model's name (evo2_7b_base, evo2_7b, ...) or its "
                    "vortex YAML config")
flags.DEFINE_string("output", None, "new directory for the sh2_jax checkpoint")
flags.mark_flags_as_required(["checkpoint", "config", "output"])


def run(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    common.check_new_dir("output", f.output)
    model = from_vortex(f.checkpoint, f.config)
  except (ValueError, FileNotFoundError) as e:
    fail(str(e))
  save_model(f.output, model)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"wrote {f.output}: {len(model.blocks)} layers "
        f"({'-'.join(model.cfg.layer_types)}), {n:,} parameters")


def main() -> None:
  """The ``sh2-convert`` command."""
  launch(run, __name__)


if __name__ == "__main__":
  main()
