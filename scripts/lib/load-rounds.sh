# Sourced by the protocol benches: the frame path's frames/s with and without a client's load,
# interleaved, from the daemon's /metrics.
#   load_rounds HTTP_PORT SECONDS NAME START STOP
# START (a function) starts the load in the background and returns once it runs; STOP ends it.
# Prints each round, then the median, least and most of each mode (`rates_summary`).
load_rounds() {
  local http=$1 secs=$2 name=$3 start=$4 stop=$5 rates a b round mode
  rates=$(mktemp)
  frames() { curl -s "127.0.0.1:$http/metrics" | awk '/^anomalyd_frames_total/ { n += $2 } END { print n + 0 }'; }
  until curl -sf "127.0.0.1:$http/readyz" >/dev/null; do sleep 0.5; done
  sleep 3
  for round in 1 2 3 4 5 6 7 8; do
    for mode in idle "$name"; do
      [[ $mode == "$name" ]] && $start
      a=$(frames); sleep "$secs"; b=$(frames)
      [[ $mode == "$name" ]] && $stop
      echo "$mode $(awk -v a="$a" -v b="$b" -v s="$secs" 'BEGIN { printf "%.1f", (b - a) / s }')" | tee -a "$rates"
    done
  done
  rates_summary "$rates"
  rm -f "$rates"
}

# The median, least and most frames/s of each mode in FILE (lines "MODE RATE").
rates_summary() {
  python3 - "$1" <<'PY'
import statistics, sys
r = {}
for line in open(sys.argv[1]):
    mode, v = line.split()
    r.setdefault(mode, []).append(float(v))
for mode, v in r.items():
    print(f"{mode}: median {statistics.median(v):.1f} frames/s (min {min(v):.1f}, max {max(v):.1f}, {len(v)} rounds)")
PY
}
