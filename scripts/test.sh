#!/usr/bin/env bash
# The test command: installs what the tests need, then format check, lints and the test suite.
# The last line is the total over every test binary: "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test >/dev/null
# The daemon tests need a real broker: with this set, a missing mosquitto fails them instead of skipping.
export ANOMALYD_REQUIRE_MOSQUITTO=1
# The language-model tests run the real local model (setup.sh --test fetched it): never skip them here.
export ANOMALYD_REQUIRE_LLM=1
# The PLC protocol tests drive anomalyd with real clients from PyPI (setup.sh --test installed them).
export ANOMALYD_REQUIRE_PLC_CLIENTS=1
# The operator station's test drives Debian's headless Chromium (setup.sh --test installed it).
export ANOMALYD_REQUIRE_BROWSER=1
command -v cargo >/dev/null || { echo "cargo is missing: install Rust 1.95 with rustup" >&2; exit 1; }
# NVRTC from .venv compiles the GPU kernels in the tests (no GPU needed; the parity tests skip).
nvrtc=$(ls -d .venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib 2>/dev/null | head -1 || true)
[[ -n $nvrtc ]] && export LD_LIBRARY_PATH=$PWD/$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features cuda,llm -- -D warnings
# The lean build (no GStreamer, no embedded broker) must keep compiling too.
cargo check --quiet --no-default-features --lib
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# The tests run with the GPU path built in (feature cuda): without a GPU it falls back to the CPU. And
# with the local language model (feature llm: llama.cpp, built from source on the first run).
cargo test --all-targets --features cuda,llm "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
