#!/usr/bin/env bash
# A Cloud TPU slice end to end, and kept going until the run is done:
#   1. creates the TPU VM (or a queued resource with --queued), or reuses it if it exists,
#      with the runtime version of its generation (v4, v5e, v5p, v6e; --version overrides);
#   2. copies this checkout (`git archive` of HEAD) to every worker and makes a Python 3.11
#      venv with vlp[tpu] there (~/vlp-venv);
#   3. kills stale processes holding the TPU, then starts `vlp train` on all workers at once,
#      detached (setsid nohup), one log per worker (~/vlp-train.log on each);
#   4. watches: when the slice is preempted (spot/queued) it is recreated and training
#      relaunched, which resumes from the workdir's last checkpoint; when vlp stops
#      after a SIGTERM (maintenance) it is relaunched; it ends when every worker's
#      train exited 0 without being preempted;
#   5. deletes the slice only with --delete.
# A multi-host slice needs a gs:// workdir (hosts share no disk); a local one is refused.
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE --accelerator=v5litepod-16 \
#     [--version=RUNTIME] [--spot] [--queued] [--delete] [--poll=60] \
#     --config=configs/align_web.py --workdir=gs://BUCKET/run [--config.key=value ...]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NAME='' ZONE='' ACC='' VERSION='' SPOT=() QUEUED=0 DELETE=0 POLL=60 WORKDIR='' ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    --name=*) NAME=${a#*=} ;;
    --zone=*) ZONE=${a#*=} ;;
    --accelerator=*) ACC=${a#*=} ;;
    --version=*) VERSION=${a#*=} ;;
    --spot) SPOT=(--spot) ;;
    --queued) QUEUED=1 ;;
    --delete) DELETE=1 ;;
    --keep) ;;  # the default now: the slice is deleted only with --delete
    --poll=*) POLL=${a#*=} ;;
    *) [[ "$a" == --workdir=* ]] && WORKDIR=${a#*=}; ARGS+=("$(printf '%q' "$a")") ;;
  esac
done
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
[[ -n "$NAME" && -n "$ZONE" && -n "$ACC" ]] || die '--name, --zone and --accelerator are required'
[[ -n "$WORKDIR" ]] || die '--workdir is required'

# generation -> runtime version and chips per host; N in the type counts TensorCores (v4, v5p:
# 2 per chip, 4 chips a host) or chips (v5e, v6e: up to 8 on one host, else 4 a host)
SIZE=${ACC##*-}
case "$ACC" in
  v4-*)                  DEFAULT_VERSION=tpu-ubuntu2204-base;   HOSTS=$(( SIZE <= 8 ? 1 : SIZE / 8 )) ;;
  v5p-*)                 DEFAULT_VERSION=v2-alpha-tpuv5;         HOSTS=$(( SIZE <= 8 ? 1 : SIZE / 8 )) ;;
  v5litepod-*|v5e-*)     DEFAULT_VERSION=v2-alpha-tpuv5-lite;    HOSTS=$(( SIZE <= 8 ? 1 : SIZE / 4 )) ;;
  v6e-*)                 DEFAULT_VERSION=v2-alpha-tpuv6e;        HOSTS=$(( SIZE <= 8 ? 1 : SIZE / 4 )) ;;
  *) die "unknown accelerator type $ACC (v4-N, v5p-N, v5litepod-N, v6e-N)" ;;
esac
VERSION=${VERSION:-$DEFAULT_VERSION}
if (( HOSTS > 1 )) && [[ "$WORKDIR" != gs://* ]]; then
  die "$ACC has $HOSTS hosts, which share no disk: use a gs:// workdir (got $WORKDIR)"
fi

TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
where=(--zone="$ZONE")
SSH=("${TPU[@]}" ssh "$NAME" "${where[@]}" --worker=all)

state() {  # READY, PREEMPTED, CREATING, ... or NONE
  "${TPU[@]}" describe "$NAME" "${where[@]}" --format='value(state)' 2>/dev/null || echo NONE
}

create() {
  if ((QUEUED)); then
    run "${QR[@]}" create "$NAME" --node-id="$NAME" "${where[@]}" --accelerator-type="$ACC" \
      --runtime-version="$VERSION" "${SPOT[@]}"
    [[ "${DRY_RUN:-0}" == 1 ]] && return
    until [[ "$(state)" == READY ]]; do sleep 30; done  # the queued resource becomes ACTIVE
  else
    run "${TPU[@]}" create "$NAME" "${where[@]}" --accelerator-type="$ACC" --version="$VERSION" "${SPOT[@]}"
  fi
}

delete() {
  if ((QUEUED)); then
    run "${QR[@]}" delete "$NAME" "${where[@]}" --force --quiet
  else
    run "${TPU[@]}" delete "$NAME" "${where[@]}" --quiet
  fi
}

install() {
  local code=/tmp/vlp-$NAME.tar.gz
  run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$code" HEAD
  run "${TPU[@]}" scp "$code" "$NAME:vlp.tar.gz" "${where[@]}" --worker=all
  # Python >= 3.11 (the pinned jax needs it; the TPU images ship 3.10), a venv, vlp[tpu]
  run "${SSH[@]}" --command="set -e; rm -rf vlp && mkdir vlp && tar -xzf vlp.tar.gz -C vlp; \
command -v python3.11 >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv; }; \
[ -x vlp-venv/bin/python ] || python3.11 -m venv vlp-venv; vlp-venv/bin/pip install -q -e 'vlp[tpu]'"
}

start() {
  # stale processes holding the TPU (a previous run, a crashed notebook) would make libtpu fail
  run "${SSH[@]}" --command="sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9; \
sudo rm -f /tmp/libtpu_lockfile; rm -f vlp-train.exit; cd vlp && setsid nohup bash -c \
'../vlp-venv/bin/python -m vlp.cli train --no_progress ${ARGS[*]}; echo \$? > ../vlp-train.exit' \
> ../vlp-train.log 2>&1 < /dev/null &"
}

# what every worker's train did: 'running', or its exit code, and whether it was preempted
STATUS_CMD='if pgrep -f "[v]lp.cli train" >/dev/null; then echo running; elif [ -f vlp-train.exit ]; then
  if grep -q "preempted: saved step" vlp-train.log; then echo preempted; else echo "exit $(cat vlp-train.exit)"; fi;
else echo none; fi'

case "$(if [[ "${DRY_RUN:-0}" == 1 ]]; then echo NONE; else state; fi)" in
  NONE) create ;;
  PREEMPTED|TERMINATED) delete; create ;;
  *) echo "tpu_pod.sh: reusing $NAME" >&2 ;;
esac
install
start
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  run "${SSH[@]}" --command="$STATUS_CMD"  # then every --poll seconds until done
  ((DELETE)) && delete
  exit 0
fi
status=0
while true; do
  sleep "$POLL"
  s=$(state)
  if [[ "$s" == PREEMPTED || "$s" == TERMINATED || "$s" == NONE ]]; then
    echo "tpu_pod.sh: $NAME is $s: recreating and resuming" >&2
    [[ "$s" == NONE ]] || delete
    create; install; start; continue
  fi
  [[ "$s" == READY ]] || continue
  workers=$("${SSH[@]}" --command="$STATUS_CMD" 2>/dev/null || echo unknown)
  if grep -qE 'running|unknown' <<<"$workers"; then continue; fi
  if grep -q preempted <<<"$workers"; then
    echo 'tpu_pod.sh: training was preempted (SIGTERM): relaunching' >&2; start; continue
  fi
  if grep -qv 'exit 0' <<<"$workers"; then
    echo "tpu_pod.sh: training failed on a worker (see ~/vlp-train.log there): $workers" >&2; status=1
  fi
  break
done
((DELETE)) && delete
exit $status
