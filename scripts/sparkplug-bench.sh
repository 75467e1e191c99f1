#!/usr/bin/env bash
# The cost of Sparkplug B to the frame path (docs/PLC.md): an every-frame camera as fast as it is
# inspected, publishing to the embedded broker as JSON verdicts or as Sparkplug B DDATA, one daemon
# after the other (interleaved, ROUNDS rounds of SECONDS each), frames/s from /metrics.
#   scripts/sparkplug-bench.sh [seconds per round] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
rounds=${2:-6}
bin=target/release/anomalyd
py=.venv/bin/python
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* | head -1)}
work=$(mktemp -d)
pid=
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
port() { $py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$bin" demo --out "$work/demo" >/dev/null 2>&1

# One round: a fresh daemon in MODE (json | sparkplug), its frames/s over SECONDS once it is ready.
round() {
  local mode=$1 http a b
  http=$(port)
  {
    cat <<TOML
[daemon]
node = "bench"
exit_when_sources_end = false
enrolments = ""
[mqtt]
embedded_port = $(port)
[http]
listen = "127.0.0.1:$http"
[outbox]
path = "$work/outbox-$mode-$RANDOM.redb"
[store]
dir = ""
[llm]
backend = "off"
[[camera]]
name = "line"
reference = "$work/demo/demo.enrol"
learn_parts = 0
[camera.source]
kind = "demo"
fps = 0
frames = 0
TOML
    # No primary host: births go out at once, and every verdict is a DDATA.
    [[ $mode == sparkplug ]] && printf '[mqtt.sparkplug]\nenabled = true\ngroup_id = "bench"\nprimary_host_id = ""\n'
  } >"$work/$mode.toml"
  "$bin" --config "$work/$mode.toml" run >/dev/null 2>"$work/$mode.log" &
  pid=$!
  until curl -sf "127.0.0.1:$http/readyz" >/dev/null; do sleep 0.2; done
  sleep 2
  frames() { curl -s "127.0.0.1:$http/metrics" | awk '/^anomalyd_frames_total/ { n += $2 } END { print n + 0 }'; }
  a=$(frames); sleep "$secs"; b=$(frames)
  if [[ $mode == sparkplug ]] && ! curl -s "127.0.0.1:$http/metrics" | grep -q '^anomalyd_sparkplug_births_total{result="connect"} [1-9]'; then
    echo "the Sparkplug daemon was never born: $work/$mode.log" >&2
    exit 1
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  echo "$mode $(awk -v a="$a" -v b="$b" -v s="$secs" 'BEGIN { printf "%.1f", (b - a) / s }')" | tee -a "$work/rates"
}
for _ in $(seq "$rounds"); do
  round json
  round sparkplug
done
# shellcheck source=scripts/lib/load-rounds.sh
. scripts/lib/load-rounds.sh
rates_summary "$work/rates"
