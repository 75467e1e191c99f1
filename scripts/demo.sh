#!/usr/bin/env bash
# The main job on the built-in default: enrol the built-in part from one shot and inspect a good part,
# a scratched one and a contaminated one. Verdicts print as JSON and text; overlays go to anomalyd-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo run --release --quiet -- demo "$@"
