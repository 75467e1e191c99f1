#!/usr/bin/env bash
# The main job on the built-in default: the inspection daemon with its demo camera (generated parts,
# every third one defective) and its embedded MQTT broker on 127.0.0.1:1883. Each verdict is logged
# as it is published; watch the MQTT messages from another terminal with
#   mosquitto_sub -h 127.0.0.1 -p 1883 -u anomalyd -P "$(cat anomalyd-state/mqtt-embedded.password)" -t 'anomalyd/#' -v
# The demo camera makes 30 parts at 5 per second, then the daemon drains and exits. Extra arguments go
# to `anomalyd run` (e.g. --duration 60); `anomalyd demo` is the offline one-shot version.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo run --release --quiet -- run "$@"
