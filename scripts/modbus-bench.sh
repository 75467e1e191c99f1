#!/usr/bin/env bash
# The figures of docs/PLC.md's Modbus table: a pymodbus PLC (tests/plc/modbus_plc.py) runs the handshake
# for N parts against a release build, then the frame path's frames/s is measured with and without a PLC
# polling the status bits every 2 ms (interleaved, 4 rounds each). Needs a release build and
# `scripts/setup.sh --test` (pymodbus in .venv).
#   scripts/modbus-bench.sh [parts] [seconds per round]
set -euo pipefail
cd "$(dirname "$0")/.."
parts=${1:-500}
secs=${2:-5}
bin=target/release/anomalyd
py=.venv/bin/python
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* | head -1)}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
port() { $py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$bin" demo --out "$work/demo" >/dev/null 2>&1
mkdir -p "$work/frames"
cp "$work"/demo/good_*.png "$work/frames/"
cp "$work/demo/scratch.png" "$work/frames/"

# 1. The handshake, part after part.
mb=$(port)
# The sections both runs share: embedded broker, no store, no language model.
header() {
  cat <<TOML
[daemon]
node = "bench"
exit_when_sources_end = false
enrolments = ""
[mqtt]
embedded_port = $(port)
[store]
dir = ""
[llm]
backend = "off"
TOML
}
{ header; cat <<TOML
[http]
listen = ""
[outbox]
path = "$work/outbox1.redb"
[modbus]
listen = "127.0.0.1:$mb"
[[camera]]
name = "station"
reference = "$work/demo/demo.enrol"
trigger = "triggered"
learn_parts = 0
[camera.source]
kind = "files"
path = "$work/frames"
repeat = true
TOML
} >"$work/plc.toml"
"$bin" --config "$work/plc.toml" run >/dev/null 2>"$work/plc.log" &
pids+=($!)
$py tests/plc/modbus_plc.py --port "$mb" --parts "$parts" >"$work/plc.json"
$py - "$work/plc.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t, s = r["trigger_to_result_ms"], r["server_trigger_to_result_ms"]
print(f"handshake: {len(r['parts'])} parts, {r['rate_parts_per_s']:.1f} parts/s; trigger -> ResultReady as the PLC "
      f"saw it p50 {t['p50']:.1f} ms, p99 {t['p99']:.1f} ms, max {t['max']:.1f} ms; as anomalyd measured it "
      f"p50 {s['p50']} ms, p99 {s['p99']} ms")
PY
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()

# 2. What a polling PLC costs the frame path: an every-frame camera as fast as it is inspected.
mb=$(port)
http=$(port)
{ header; cat <<TOML
[http]
listen = "127.0.0.1:$http"
[outbox]
path = "$work/outbox2.redb"
[modbus]
listen = "127.0.0.1:$mb"
[[camera]]
name = "line"
learn_parts = 0
[camera.source]
kind = "demo"
fps = 0
frames = 0
TOML
} >"$work/load.toml"
"$bin" --config "$work/load.toml" run >/dev/null 2>"$work/load.log" &
pids+=($!)
# The PLC's polling, as a PLC scans: status bits and result registers every 2 ms. It runs on the same
# cores as anomalyd here (a real PLC does not), so the figure overstates the cost.
poll() {
  exec $py - "$mb" <<'PY'
import sys, time
from pymodbus.client import ModbusTcpClient
c = ModbusTcpClient("127.0.0.1", port=int(sys.argv[1]))
c.connect()
try:
    while True:
        c.read_discrete_inputs(0, count=9, device_id=1)
        c.read_input_registers(0, count=12, device_id=1)
        time.sleep(0.002)
except Exception:
    pass
PY
}
start_poll() { poll & ppid=$!; sleep 0.5; }
stop_poll() { kill $ppid; wait $ppid 2>/dev/null || true; }
# shellcheck source=scripts/lib/load-rounds.sh
. scripts/lib/load-rounds.sh
load_rounds "$http" "$secs" polling start_poll stop_poll
