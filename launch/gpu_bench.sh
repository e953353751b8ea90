#!/usr/bin/env bash
# The training step on a GPU, vlp against open_clip (CLIP ViT-B/16, configs/clip_b16.py), end to end:
#   1. a venv with vlp[gpu] (JAX with CUDA 12): $GPU_VENV, default .venv-gpu;
#   2. the open_clip environment with a CUDA torch: launch/setup_bench_env.sh --full into
#      $BENCH_VENV, default .venv-bench-gpu (not .venv-bench, which may hold the CPU-only torch;
#      PyPI's x86_64 torch wheels are CUDA builds: the driver must be recent enough for theirs);
#   3. checks that both see the GPU (nvidia-smi, jax.devices(), torch.cuda);
#   4. `vlp bench step --config=configs/clip_b16.py --compare=open_clip` on one GPU (--gpu=N,
#      default 0; the reference is single-GPU): batch 256, vlp in bf16 with fp32 params, open_clip
#      under torch.autocast(bf16) with scaled_dot_product_attention. It prints examples/s, step
#      ms, MFU (model FLOPs over the GPU's datasheet bf16 dense peak, vlp/bench/peak.py) and peak
#      memory of both, then one JSON line. JAX does not preallocate the GPU's memory: the
#      reference runs first, in its own process.
# --profile[=DIR] and --config.key=value are passed on to `vlp bench step`.
#   launch/gpu_bench.sh [--dry-run] [--gpu=0] [--steps=20] [--warmup=5] [--profile[=DIR]] [--config.key=value ...]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GPU_VENV=${GPU_VENV:-$ROOT/.venv-gpu}
BENCH_VENV=${BENCH_VENV:-$ROOT/.venv-bench-gpu}
GPU=0 STEPS=20 WARMUP=5 ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    --gpu=*) GPU=${a#*=} ;;
    --steps=*) STEPS=${a#*=} ;;
    --warmup=*) WARMUP=${a#*=} ;;
    --profile|--profile=*|--config.*) ARGS+=("$a") ;;
    *) echo "gpu_bench.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
cd "$ROOT"
run "$PYTHON" -m venv "$GPU_VENV"
run "$GPU_VENV/bin/pip" install -q -e '.[gpu]'
run env VENV="$BENCH_VENV" PYTHON="$PYTHON" bash launch/setup_bench_env.sh --full
run nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
run env CUDA_VISIBLE_DEVICES="$GPU" "$GPU_VENV/bin/python" -c \
  'import jax; d = jax.devices(); assert d[0].platform == "gpu", d; print("jax", jax.__version__, d)'
run env CUDA_VISIBLE_DEVICES="$GPU" "$BENCH_VENV/bin/python" -c \
  'import torch; assert torch.cuda.is_available(), "this torch has no CUDA"; print("torch", torch.__version__, torch.cuda.get_device_name())'
run env CUDA_VISIBLE_DEVICES="$GPU" XLA_PYTHON_CLIENT_PREALLOCATE=false VLP_BENCH_PYTHON="$BENCH_VENV/bin/python" \
  "$GPU_VENV/bin/python" -m vlp.cli bench step --config=configs/clip_b16.py:1 --compare=open_clip \
  --steps="$STEPS" --warmup="$WARMUP" ${ARGS[@]+"${ARGS[@]}"}
