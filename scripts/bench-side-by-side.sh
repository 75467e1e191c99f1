#!/usr/bin/env bash
# Speed of this tree against another build, interleaved on the same machine (issue 21's measurement):
# the default size, magnetic_tile's seed-0 shot and a KolektorSDD frame, ROUNDS rounds, each case run by
# both binaries back to back. One JSON line per run; docs/RESULTS.md ("Approximate search") has figures.
#
#   git worktree add /tmp/base 8f2b308 && (cd /tmp/base && cargo build --release)
#   scripts/bench-side-by-side.sh /tmp/base/target/release/anomalyd [ROUNDS] [DATASETS]
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: bench-side-by-side.sh BASE_BINARY [ROUNDS] [DATASETS]}
rounds=${2:-2}
data=${3:-../shared/datasets}
cur=./target/release/anomalyd
[[ -x $cur ]] || cargo build --release
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1* | head -1)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tile" "$work/kos"
cp "$data/magnetic_tile/magnetic_tile/train/good/exp0_num_743.jpg" "$work/tile/"
cp "$data/kolektorsdd/kos/train/good/kos01_Part0.jpg" "$work/kos/"
run() { # label binary args...
  local label=$1 bin=$2
  shift 2
  "$bin" bench "$@" --json "$work/r.json" >/dev/null 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({'run': sys.argv[2], **{k: r[k] for k in ('frames_per_s', 'total_ms_p50', 'total_ms_p99', 'encoder_ms', 'decoder_ms', 'peak_rss_mib')}}))" "$work/r.json" "$label"
}
for round in $(seq "$rounds"); do
  run "base default $round" "$base" --frames 300
  run "this default $round" "$cur" --frames 300
  run "base magnetic_tile $round" "$base" --reference "$work/tile" --frames 100
  run "this magnetic_tile $round" "$cur" --reference "$work/tile" --frames 100
  run "base kos $round" "$base" --reference "$work/kos" --frames 60
  run "this kos $round" "$cur" --reference "$work/kos" --frames 60
done
