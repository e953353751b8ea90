#!/usr/bin/env bash
# Creates <repo root>/.venv-bench: torch (CPU) + open_clip_torch 3.3 for the
# open_clip reference of `vlp bench step --compare=open_clip`
# (benchmarks/open_clip_ref.py), and webdataset + Pillow + sentencepiece for the
# input-pipeline reference of `vlp bench data --compare=webdataset`
# (benchmarks/data_ref.py), and transformers for the CLIPModel parity tests of
# `vlp import` / `vlp export --format=hf` (tests/hf_clip_ref.py, tests/hf_bert_ref.py; protobuf for
# SiglipTokenizer). Idempotent:
# re-running checks and returns.
#
#   bash launch/setup_bench_env.sh          # cheap: torch 2.13.0 CPU wheel (~190 MB),
#                                           # open_clip_torch --no-deps, numpy (~30 s)
#   bash launch/setup_bench_env.sh --full   # torch 2.14.1 + torchvision 0.29.1 + full
#                                           # open_clip deps (x86_64: ~5.5 GB CUDA build)
#   PYTHON=python3.11 VENV=/path/to/venv bash launch/setup_bench_env.sh
#
# Why the cheap path works: open_clip/__init__.py imports torchvision (image
# transforms), and open_clip/utils.py imports one torchvision symbol used only
# for ResNet batch norms. The reference loads the unmodified open_clip.model /
# open_clip.loss modules without the package __init__ when torchvision is
# absent (see benchmarks/open_clip_ref.py). PyPI's torchvision does not import
# beside the torch 2.13.0 CPU wheel ('operator torchvision::nms does not exist'),
# so the cheap path installs none.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-bench}"
PYTHON="${PYTHON:-python3}"
MODE="${1:-cheap}"
OPEN_CLIP_VERSION="${OPEN_CLIP_VERSION:-3.3.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.24.0}"

check() {
  (cd "$ROOT" && "$VENV/bin/python" -c "
import sys; sys.path.insert(0, 'benchmarks')
import open_clip_ref as r, torch, webdataset, PIL, sentencepiece, google.protobuf
oc = r.import_open_clip()
print('bench env ok:', sys.executable, 'torch', torch.__version__, 'open_clip', oc.version, '|', oc.how)
") && "$VENV/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
}

if [[ -x "$VENV/bin/python" ]] && check 2>/dev/null; then
  exit 0
fi

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --disable-pip-version-check -q)
case "$MODE" in
  cheap|--cheap)
    # torch==2.13.0: a CPU build where pip is configured with one (elsewhere
    # use PyTorch's CPU wheel index for the same version).
    "${PIP[@]}" "torch==2.13.0"
    "${PIP[@]}" numpy pillow sentencepiece protobuf "webdataset==1.0.2"
    "${PIP[@]}" --no-deps "open_clip_torch==$OPEN_CLIP_VERSION"
    "${PIP[@]}" "transformers==$TRANSFORMERS_VERSION"
    ;;
  full|--full)
    case "$(uname -m)" in
      aarch64) "${PIP[@]}" "torch==2.9.1" "torchvision==0.24.1" ;;
      *)       "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1" ;;
    esac
    "${PIP[@]}" "open_clip_torch==$OPEN_CLIP_VERSION" pillow sentencepiece protobuf "webdataset==1.0.2" \
      "transformers==$TRANSFORMERS_VERSION"
    ;;
  *) echo "usage: $0 [--cheap|--full]" >&2; exit 2 ;;
esac
check
