"""Train-step memory per added layer: one device against a context-parallel mesh (issue 18).

Each point compiles the project's train step (``trainer.build_step``: AdamW, float32 master
weights, FSDP over fsdp x context, the configured remat) for the Evo 2 7B layout at a given width
and depth, and reads XLA's memory analysis of the compiled program; nothing is allocated, so a
mesh larger than the machine can be planned: on CPU with forced host devices, on a GPU with a
mocked multi-host topology (``--mock_gpus N``: N devices, one real, compile only). Every point
runs in its own process (the device count and XLA flags are fixed per process). The table gives
the temporaries at each depth and the slope per added layer.

  # CPU, 4 forced devices, width 256, 8K, context 4 against one device:
  python benchmarks/cp_memory.py --platform cpu --width 256 --length 8192 --layers 2,6 \
      --meshes 1x1x1,1x1x4
  # one H200 standing in for four (mocked topology), the 7B width at 128K:
  python benchmarks/cp_memory.py --width 4096 --length 131072 --layers 4,7 \
      --meshes 1x1x1,1x1x4 --mock_gpus 4 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def point(a) -> dict:
  """One compile in this process: the memory analysis of the train step (bytes per device)."""
  sys.path.insert(0, ROOT)
  import jax
  if os.environ.get("SH2_MOCK_GPU_TOPOLOGY"):
    jax.config.update("jax_mock_gpu_topology", os.environ["SH2_MOCK_GPU_TOPOLOGY"])
  import ml_collections

  from benchmarks.transformer import evo2_7b_layout
  from sh2_jax.configs.base import make_config
  from sh2_jax.sharding import AXES
  from sh2_jax.train import trainer

  data, fsdp, context = (int(s) for s in a.mesh.split("x"))
  n = data * fsdp * context
  devices = jax.devices()
  if len(devices) < n:
    raise SystemExit(f"mesh {a.mesh} needs {n} devices; this process has {len(devices)} "
                     f"({jax.process_count()} process(es), mock topology "
                     f"{os.environ.get('SH2_MOCK_GPU_TOPOLOGY', 'none')!r})")
  mesh = jax.make_mesh((data, fsdp, context), AXES, devices=devices[:n],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  cfg = evo2_7b_layout(a.width, a.layers_one, dtype=a.dtype, max_seqlen=max(a.length, 8192),
                       li_impl=a.li_impl)
  c = make_config("tiny")
  c.batch_size = data * fsdp
  c.seq_len = a.length
  c.remat = a.remat
  c.mesh = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, context=context))
  c.context_parallel.mr_mode, c.context_parallel.li_mode = a.mr_mode, a.li_mode
  c.context_parallel.attention_mode = a.attention_mode
  rep = trainer.memory_report(c, cfg, mesh, device_memory=0)
  return dict(kind="memory", platform=jax.default_backend(), devices=n, mesh=a.mesh,
              width=a.width, L=a.length, layers=a.layers_one, remat=a.remat, dtype=a.dtype,
              li_impl=a.li_impl, modes=f"{a.mr_mode}/{a.li_mode}/{a.attention_mode}",
              xla_flags=a.xla_flags, mock_gpus=a.mock_gpus, **{k: rep[k] for k in (
                  "arguments", "temporaries", "output", "aliased", "total")})


def run_point(a, mesh: str, layers: int, xla_flags: str) -> dict:
  env = dict(os.environ)
  n = 1
  for s in mesh.split("x"):
    n *= int(s)
  flags = [env.get("XLA_FLAGS", ""), xla_flags]
  if a.platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    flags.append(f"--xla_force_host_platform_device_count={max(n, 1)}")
  elif a.mock_gpus and n > 1:
    # a mocked topology of n devices (jax_mock_gpu_topology, "slices x hosts x devices per
    # host"): the real GPU is device 0, the others exist for the compiler only (collectives are
    # mocked; nothing here executes)
    env["SH2_MOCK_GPU_TOPOLOGY"] = a.mock_topology.format(n=n)
    # autotuning is otherwise sharded over the (mocked) processes, and the compile waits for
    # results from processes that do not exist
    flags.append("--xla_gpu_shard_autotuning=false")
  if a.dump:  # XLA's buffer assignment (the peak buffers, with their JAX source) per point
    flags.append(f"--xla_dump_to={os.path.join(a.dump, mesh + '_' + str(layers))} "
                 "--xla_dump_hlo_module_re=.*train_step.*")
  env["XLA_FLAGS"] = " ".join(f for f in flags if f)
  cmd = [sys.executable, os.path.abspath(__file__), "--_point", "--mesh", mesh,
         "--layers_one", str(layers), f"--xla_flags={xla_flags}"]
  for k in ("width", "length", "remat", "dtype", "li_impl", "mr_mode", "li_mode",
            "attention_mode", "mock_gpus"):
    cmd += [f"--{k}", str(getattr(a, k))]
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout_s)
  for line in p.stdout.splitlines()[::-1]:
    if line.startswith("{"):
      return json.loads(line)
  tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
  return dict(kind="failed", mesh=mesh, layers=layers, xla_flags=xla_flags, rc=p.returncode,
              error=" | ".join(tail)[-600:])


def table(rows: list[dict]) -> str:
  gib = lambda b: f"{b / 2**30:.3f}"
  out = ["| mesh (data x fsdp x context) | XLA flags | layers | arguments GiB | temporaries GiB | "
         "total GiB | temporaries per added layer GiB |", "|---|---|---|---|---|---|---|"]
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["mesh"], r.get("xla_flags", "")), []).append(r)
  for (mesh, flags), rs in groups.items():
    ok = sorted((r for r in rs if r["kind"] == "memory"), key=lambda r: r["layers"])
    for i, r in enumerate(ok):
      slope = ""
      if i:
        p = ok[i - 1]
        slope = gib((r["temporaries"] - p["temporaries"]) / (r["layers"] - p["layers"]))
      out.append(f"| {mesh} | {flags or 'default'} | {r['layers']} | {gib(r['arguments'])} | "
                 f"{gib(r['temporaries'])} | {gib(r['total'])} | {slope} |")
    for r in rs:
      if r["kind"] == "failed":
        out.append(f"| {mesh} | {flags or 'default'} | {r['layers']} | failed: {r['error']} |"
                   " | | |")
  return "\n".join(out)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--platform", default="", help="cpu: forced host devices; empty: the default")
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--length", type=int, default=8192)
  p.add_argument("--layers", default="2,6", help="depths to compile (comma-separated)")
  p.add_argument("--meshes", default="1x1x1,1x1x4", help="data x fsdp x context, comma-separated")
  p.add_argument("--xla_variants", default="", help="';'-separated extra XLA_FLAGS sets; "
                 "'' is the default set")
  p.add_argument("--remat", default="blocks")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--li_impl", default="fft")
  p.add_argument("--mr_mode", default="p2p")
  p.add_argument("--li_mode", default="a2a")
  p.add_argument("--attention_mode", default="allgather")
  p.add_argument("--mock_gpus", type=int, default=0, help="GPU: mock this many devices")
  p.add_argument("--mock_topology", default="1x{n}x1", help="the mocked topology ({n}: devices)")
  p.add_argument("--timeout_s", type=float, default=900)
  p.add_argument("--dump", default="", help="dump XLA's optimized HLO and buffer assignment here")
  p.add_argument("--out", default=os.environ.get("OUT", ""))
  p.add_argument("--_point", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--mesh", default="1x1x1", help=argparse.SUPPRESS)
  p.add_argument("--layers_one", type=int, default=2, help=argparse.SUPPRESS)
  p.add_argument("--xla_flags", default="", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.__dict__["_point"]:
    print(json.dumps(point(a)), flush=True)
    return
  rows = []
  variants = a.xla_variants.split(";") if a.xla_variants else [""]
  for flags in variants:
    for mesh in a.meshes.split(","):
      for layers in (int(s) for s in a.layers.split(",")):
        r = run_point(a, mesh, layers, flags.strip())
        rows.append(r)
        print(json.dumps(r), flush=True)
  print(table(rows))
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "cp_memory.jsonl"), "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
