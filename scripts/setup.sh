#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh machine: a venv in .venv with metaopt and its test
# extras, and the Debian Fashion-MNIST files when apt is available. GPU users: install the
# torch build for your CUDA first (https://pytorch.org), then run this with METAOPT_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "${METAOPT_KEEP_TORCH:-0}" != 1 ]; then
  # Pinned CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
  python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
    || pip install -q torch==2.13.0
fi
pip install -q -e ".[dev]"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "setup: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped" >&2
fi
