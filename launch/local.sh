#!/usr/bin/env bash
# One process on this machine (its CPU, GPUs or TPU chips): `vlp train` with the given flags.
#   launch/local.sh [--dry-run] --config=configs/align_tiny.py --workdir=DIR [--config.key=value ...]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
[[ "${1:-}" == --dry-run ]] && { DRY_RUN=1; shift; }
run "$PYTHON" -m vlp.cli train "$@"
