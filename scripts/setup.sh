#!/usr/bin/env bash
# Installs what anomalyd needs at run time: the ONNX Runtime shared library, from PyPI's onnxruntime
# wheel, into the project's own venv (.venv), where anomalyd finds it without configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=${ORT_VERSION:-1.32.0}
if ! ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* >/dev/null 2>&1; then
  if ! python3 -m venv .venv 2>/dev/null; then
    echo "python3 venv is missing; installing python3-venv with apt" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv python3-pip
    python3 -m venv .venv
  fi
  echo "installing onnxruntime==$ORT_VERSION from PyPI into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check "onnxruntime==$ORT_VERSION"
fi
ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* | head -1
