#!/usr/bin/env bash
# N local processes, each with D simulated CPU devices, joined by jax.distributed
# (gloo collectives): a multi-host job on one machine. SIGTERM/SIGINT are passed
# on to every process, which then save and exit 0 (vlp's preemption handling).
#   launch/multiprocess_cpu.sh [--dry-run] [--processes=2] [--devices=4] [--port=PORT] \
#     --config=configs/align_tiny.py --workdir=DIR [--config.key=value ...]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
N=2 D=4 PORT=${PORT:-12355} ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    --processes=*) N=${a#*=} ;;
    --devices=*) D=${a#*=} ;;
    --port=*) PORT=${a#*=} ;;
    *) ARGS+=("$a") ;;
  esac
done
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < N; i++)); do
  cmd=(env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$D
       "$PYTHON" -m vlp.cli train --coordinator=localhost:$PORT --num_processes=$N --process_id=$i "${ARGS[@]}")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then run "${cmd[@]}"; else "${cmd[@]}" & pids+=($!); fi
done
wait_for() {  # a trapped signal cuts `wait` short (status > 128): wait on while the process lives
  local s
  while true; do
    s=0; wait "$1" || s=$?
    if ((s > 128)) && kill -0 "$1" 2>/dev/null; then continue; fi
    return $s
  done
}
status=0
for p in "${pids[@]}"; do wait_for "$p" || status=$?; done
exit $status
