#!/usr/bin/env bash
# The figures of the README's operator-station section: the frame path's frames/s with the line page
# open in headless Chromium (live over server-sent events) against without it (interleaved, 8 rounds
# each), and the time from a verdict to its tile's event reaching a page-like client (Python, reading
# /ui/events as the page does; a tile goes out at most every 200 ms, with the newest verdict). Needs a release build and chromium (`scripts/setup.sh --test`).
#   scripts/ui-bench.sh [seconds per round]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
bin=target/release/anomalyd
chromium=$(command -v chromium || command -v chromium-browser || true)
[[ -n $chromium ]] || { echo "chromium is missing: scripts/setup.sh --test installs it" >&2; exit 1; }
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* | head -1)}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

http=$(port)
cat >"$work/ui.toml" <<TOML
[daemon]
node = "bench"
enrolments = "$work/enrolments"
[mqtt]
embedded_port = $(port)
[http]
listen = "127.0.0.1:$http"
[outbox]
path = "$work/outbox.redb"
[store]
dir = "$work/store"
[llm]
backend = "off"
[ui]
audit = "$work/audit.jsonl"
[[camera]]
name = "line"
learn_parts = 0
[camera.source]
kind = "demo"
fps = 0
frames = 0
TOML
"$bin" --config "$work/ui.toml" run >/dev/null 2>"$work/daemon.log" &
pids+=($!)

# 1. Verdict -> event at a page-like client, over 10 s of a camera running flat out.
until curl -sf "127.0.0.1:$http/readyz" >/dev/null; do sleep 0.5; done
python3 - "$http" <<'PY'
import http.client, json, statistics, sys, time
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
c.request("GET", "/ui/events")
r = c.getresponse()
lat, t_end, event = [], time.time() + 10, None
while time.time() < t_end:
    line = r.fp.readline().decode().rstrip("\n")
    if line.startswith("data: "):
        t = json.loads(line[6:])
        last = t["last"]
        made = last["captured_unix_ms"] + last["latency_ms"]["total"]
        lat.append(time.time() * 1e3 - made)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"verdict -> tile event: {len(lat)} events, p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {lat[-1]:.1f} ms")
PY

# 2. What an open line page costs the frame path.
start_page() {
  "$chromium" --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --window-size=1280,800 \
    --user-data-dir="$work/chromium" "http://127.0.0.1:$http/ui/" >/dev/null 2>&1 &
  cpid=$!
  # The page is live once the daemon has a reader on its event stream.
  until curl -s "127.0.0.1:$http/metrics" | grep -q '^anomalyd_ui_streams 1'; do sleep 0.1; done
}
stop_page() { kill $cpid; wait $cpid 2>/dev/null || true; }
# shellcheck source=scripts/lib/load-rounds.sh
. scripts/lib/load-rounds.sh
load_rounds "$http" "$secs" page-open start_page stop_page
