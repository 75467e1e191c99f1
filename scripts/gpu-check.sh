#!/usr/bin/env bash
# The GPU check, in one go on a machine with an NVIDIA GPU: builds anomalyd with --features cuda
# (or takes prebuilt binaries from $GPU_CHECK_BIN: `anomalyd` and `tests`), runs the GPU parity
# tests against the CPU reference, benches the CPU and the GPU path at batch 1 and 8, and prints a
# table. Needs the CUDA driver, NVRTC and (optionally) cuBLAS, and ONNX Runtime for the CPU path
# (the project's .venv or a python3 with onnxruntime). Results go to $GPU_CHECK_OUT (target/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-target/gpu-check}
mkdir -p "$out"
log() { printf '== %s\n' "$*"; }

# CUDA libraries. cudarc (built for the CUDA 12.8 API) loads libnvrtc.so / libcublas.so or their
# .so.12 names; CUDA 13 installs .so.13 only, so link the newest found under the plain names.
shim=$(mktemp -d)
dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/targets/sbsa-linux/lib
  /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu)
while IFS= read -r d; do dirs+=("$d"); done < <(python3 - 2>/dev/null <<'EOF'
import glob, site
for s in site.getsitepackages():
    for d in glob.glob(s + "/nvidia/*/lib") + glob.glob(s + "/nvidia/cu*/lib"):
        print(d)
EOF
)
libpath=$shim
for lib in nvrtc cublas cublasLt; do
  found=$(for d in "${dirs[@]}"; do ls "$d"/lib$lib.so.[0-9]* 2>/dev/null; done | grep -v alt | sort -V | tail -1)
  if [[ -n $found ]]; then
    ln -sf "$found" "$shim/lib$lib.so"
    libpath=$libpath:$(dirname "$found")
    log "lib$lib: $found"
  else
    log "lib$lib: not found"
  fi
done
export LD_LIBRARY_PATH=$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# ONNX Runtime for the CPU reference.
if [[ -z ${ORT_DYLIB_PATH:-} ]]; then
  ORT_DYLIB_PATH=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -1)
  [[ -z $ORT_DYLIB_PATH ]] && ORT_DYLIB_PATH=$(python3 -c 'import glob, os, onnxruntime as o; print(sorted(glob.glob(os.path.dirname(o.__file__) + "/capi/libonnxruntime.so*"))[0])' 2>/dev/null)
  export ORT_DYLIB_PATH
fi
log "onnxruntime: ${ORT_DYLIB_PATH:-not found}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/== gpu: /'

# Binaries.
if [[ -n ${GPU_CHECK_BIN:-} ]]; then
  bin=$GPU_CHECK_BIN/anomalyd
  tests=$GPU_CHECK_BIN/tests
  log "prebuilt binaries from $GPU_CHECK_BIN"
elif command -v cargo >/dev/null; then
  log "building with --features cuda (release)"
  cargo build --release --no-default-features --features cuda || exit 1
  tests=$(cargo test --release --no-default-features --features cuda --test tests --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
  bin=target/release/anomalyd
else
  echo "no cargo and no GPU_CHECK_BIN: nothing to run" >&2
  exit 1
fi

status=0
log "parity tests (GPU 0 against the CPU reference)"
"$tests" gpu:: --test-threads=1 --nocapture 2>&1 | tee "$out/parity.log" || status=1

for dev in cpu cuda:0; do
  for b in 1 8; do
    frames=400
    [[ $dev == cpu ]] && frames=160
    log "bench $dev batch $b"
    "$bin" bench --device "$dev" --batch "$b" --frames "$frames" --warmup 16 --json "$out/bench-${dev/:/}-b$b.json" \
      2>&1 | tail -9 || status=1
  done
done
log "bench cuda:0 at 4x the default pixels (512x448), batch 1 and 8"
for b in 1 8; do
  "$bin" bench --device cuda:0 --pixels 262144 --batch "$b" --frames 400 --warmup 16 \
    --json "$out/bench-cuda0-big-b$b.json" 2>&1 | tail -3 || status=1
done

python3 - "$out" <<'EOF'
import glob, json, re, sys
out = sys.argv[1]
print("\n| device | input | batch | frames/s | p50 ms | p99 ms | encoder ms | decoder ms | preprocess ms | peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(out + "/bench-*.json")):
    r = json.load(open(f))
    print(f"| {r['device']} | {r['input']} | {r['batch']} | {r['frames_per_s']:.1f} | {r['total_ms_p50']:.2f} | "
          f"{r['total_ms_p99']:.2f} | {r['encoder_ms']:.3f} | {r['decoder_ms']:.3f} | {r['preprocess_ms']:.3f} | {r['peak_rss_mib']:.0f} |")
text = open(out + "/parity.log").read()
errs = re.findall(r"score err ([0-9.e+-]+) \| map err ([0-9.e+-]+)", text)
if errs:
    print(f"\nparity: {len(errs)} comparisons, worst score error {max(float(a) for a, _ in errs):.2e}, "
          f"worst map error {max(float(b) for _, b in errs):.2e} (relative; limit 1e-3)")
for line in re.findall(r"GPU encoder vs onnxruntime.*|test result.*", text):
    print(line)
EOF
exit $status
