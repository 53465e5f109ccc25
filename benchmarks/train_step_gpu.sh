#!/bin/bash
# Tokens/s and MFU of short train.py runs of the evo2_7b layout (32 layers, MHA at 3,10,17,24,31)
# at reduced width, bf16 compute, float32 master weights and AdamW, on one GPU.
# Usage: bash benchmarks/train_step_gpu.sh OUTDIR     (numbers land in OUTDIR/<name>.jsonl)
# Env: RUN_TIMEOUT (seconds per train.py run, default 240); SMOKE=1 runs a tiny CPU version.
set -u
OUT=${1:-train_step_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}  # keep carried packages
SMOKE=${SMOKE:-0}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
run() {  # name d_model heads mlp groups batch seq conv_impl remat
  local name=$1 w
  w=$(mktemp -d)
  local steps=30 log=10
  [ "$SMOKE" = 1 ] && steps=2 log=1
  timeout "${RUN_TIMEOUT:-240}" python3 train.py --config=configs/evo2_7b.py --workdir="$w" \
    --config.model.d_model=$2 --config.model.num_heads=$3 --config.model.mlp_hidden=$4 \
    --config.model.se_groups=$5 --config.model.mr_groups=$5 --config.model.dtype=bfloat16 \
    --config.model.conv_impl=$8 --config.remat=$9 --config.batch_size=$6 --config.seq_len=$7 \
    --config.num_steps=$steps --config.log_every=$log --config.eval_every=0 \
    --config.checkpoint_every=0 --config.data.eval_fraction=0.0 > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc (d_model $2, batch $6, seq $7, conv $8, remat $9)"
  tr "\r" "\n" < "$OUT/$name.log" | grep -E "^step|rror" | tail -4
  cp "$w/metrics.jsonl" "$OUT/$name.jsonl" 2>/dev/null
  rm -rf "$w"
  return $rc
}
if [ "$SMOKE" = 1 ]; then
  run smoke 64 2 128 4 1 64 xla none
  exit
fi
run w1024_b2_l8k 1024 8 2752 64 2 8192 auto none
run w2048_b1_l8k 2048 16 5504 128 1 8192 auto none ||  # conv_impl auto = Pallas on GPU
  run w2048_b1_l8k_xla 2048 16 5504 128 1 8192 xla none
