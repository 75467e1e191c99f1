#!/usr/bin/env bash
# The figures of docs/PLC.md's OPC UA section: an asyncua client (tests/plc/opcua_client.py) logs in
# over Basic256Sha256, triggers N parts one after the other and waits for each part's ResultReady event;
# then the frame path's frames/s is measured with and without a SCADA-like client subscribed to every
# event and Result variable (interleaved, 8 rounds each). Needs a release build and
# `scripts/setup.sh --test` (asyncua in .venv).
#   scripts/opcua-bench.sh [parts] [seconds per round]
set -euo pipefail
cd "$(dirname "$0")/.."
parts=${1:-300}
secs=${2:-5}
bin=target/release/anomalyd
py=.venv/bin/python
client=tests/plc/opcua_client.py
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* | head -1)}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
port() { $py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$bin" demo --out "$work/demo" >/dev/null 2>&1
mkdir -p "$work/frames"
cp "$work"/demo/good_*.png "$work/frames/"
cp "$work/demo/scratch.png" "$work/frames/"
$py $client make-cert "$work/client"
echo "a-long-bench-password-0042" >"$work/plc.password"
session() { echo --url "opc.tcp://127.0.0.1:$1/" --user plc --password-file "$work/plc.password" \
  --cert "$work/client/client_cert.der" --key "$work/client/client_key.pem" --pki "$work/pki$2"; }
# The sections both runs share: embedded broker, no store, no language model, the OPC UA login.
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
[opcua]
listen = "127.0.0.1:$1"
pki_dir = "$work/pki$2"
[[opcua.user]]
name = "plc"
password_file = "$work/plc.password"
TOML
}

# 1. Trigger to event, part after part.
ua=$(port)
{ header "$ua" 1; cat <<TOML
[http]
listen = ""
[outbox]
path = "$work/outbox1.redb"
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
# shellcheck disable=SC2046
$py $client run $(session "$ua" 1) --parts "$parts" >"$work/plc.json"
$py - "$work/plc.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["trigger_to_event_ms"]
print(f"OPC UA: {len(r['parts'])} parts; Trigger call -> ResultReady event as the client saw it "
      f"p50 {t['p50']:.1f} ms, p99 {t['p99']:.1f} ms, max {t['max']:.1f} ms")
PY
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()

# 2. What a subscribed client costs the frame path: an every-frame camera as fast as it is inspected.
ua=$(port)
http=$(port)
{ header "$ua" 2; cat <<TOML
[http]
listen = "127.0.0.1:$http"
[outbox]
path = "$work/outbox2.redb"
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
# The client runs on the same cores as anomalyd here (a SCADA server does not), so the figure
# overstates the cost.
start_watch() {
  # shellcheck disable=SC2046
  $py $client watch $(session "$ua" 2) --camera line >"$work/watch.out" 2>&1 &
  wpid=$!
  until grep -q watching "$work/watch.out" 2>/dev/null; do sleep 0.1; done
}
stop_watch() { kill $wpid; wait $wpid 2>/dev/null || true; }
# shellcheck source=scripts/lib/load-rounds.sh
. scripts/lib/load-rounds.sh
load_rounds "$http" "$secs" subscribed start_watch stop_watch
