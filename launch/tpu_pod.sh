#!/usr/bin/env bash
# A Cloud TPU pod slice end to end: create the TPU VMs, copy this checkout
# (`git archive` of HEAD) to every worker and install it, run `vlp train` on
# all workers at once (JAX finds the other hosts by itself), then delete the
# slice (unless --keep). The workdir should be shared (gs:// is not
# supported yet: mount a shared file system, e.g. Filestore, at the same path).
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE --accelerator=v5litepod-16 \
#     [--version=tpu-ubuntu2204-base] [--spot] [--keep] \
#     --config=configs/align_web.py --workdir=/mnt/shared/run [--config.key=value ...]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NAME='' ZONE='' ACC='' VERSION=tpu-ubuntu2204-base SPOT=() KEEP=0 ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    --name=*) NAME=${a#*=} ;;
    --zone=*) ZONE=${a#*=} ;;
    --accelerator=*) ACC=${a#*=} ;;
    --version=*) VERSION=${a#*=} ;;
    --spot) SPOT=(--spot) ;;
    --keep) KEEP=1 ;;
    *) ARGS+=("$(printf '%q' "$a")") ;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" && -n "$ACC" ]] || { echo 'tpu_pod.sh: --name, --zone and --accelerator are required' >&2; exit 2; }
TPU=(gcloud compute tpus tpu-vm)
run "${TPU[@]}" create "$NAME" --zone="$ZONE" --accelerator-type="$ACC" --version="$VERSION" "${SPOT[@]}"
CODE=/tmp/vlp-$NAME.tar.gz
run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$CODE" HEAD
run "${TPU[@]}" scp "$CODE" "$NAME:vlp.tar.gz" --zone="$ZONE" --worker=all
run "${TPU[@]}" ssh "$NAME" --zone="$ZONE" --worker=all \
  --command="mkdir -p vlp && tar -xzf vlp.tar.gz -C vlp && pip install -e 'vlp[tpu]'"
status=0
run "${TPU[@]}" ssh "$NAME" --zone="$ZONE" --worker=all \
  --command="cd vlp && python3 -m vlp.cli train --no_progress ${ARGS[*]}" || status=$?
((KEEP)) || run "${TPU[@]}" delete "$NAME" --zone="$ZONE" --quiet
exit $status
