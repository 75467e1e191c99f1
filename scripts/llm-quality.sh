#!/usr/bin/env bash
# Asks each local model the same fixed questions about the same demo frames and writes the transcripts
# (docs/llm-quality/<model>.txt). docs/LLM.md scores them; the default model is the one that answers
# them best. Needs a build with --features llm and the models (python3 scripts/fetch_llm.py NAME).
#   scripts/llm-quality.sh [anomalyd binary] [model names...]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/anomalyd}
shift || true
models=("$@")
((${#models[@]})) || models=(qwen2.5-coder-1.5b-instruct-q4_k_m qwen2.5-coder-0.5b-instruct-q4_k_m smollm2-135m-instruct-q4_1)
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* | head -1)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" demo --out "$work/demo" >/dev/null 2>&1
mkdir -p docs/llm-quality
# The fixed questions, after the description (AnomalyGPT's first question).
questions=(-q "Where exactly is the defect?" -q "How large is it?" -q "What kind of defect could it be?"
  -q "Is the part good enough to ship?")
for m in "${models[@]}"; do
  gguf=models/llm/$m.gguf
  [[ -f $gguf ]] || { echo "skipping $m: $gguf is absent (python3 scripts/fetch_llm.py $m)" >&2; continue; }
  out=docs/llm-quality/$m.txt
  : >"$out"
  for frame in scratch blob good_1; do
    echo "== $frame ==" >>"$out"
    start=$(date +%s%N)
    "$bin" chat --image "$work/demo/$frame.png" --reference "$work/demo/demo.enrol" --llm-model "$gguf" \
      --product "a machined steel plate with four bolt holes and a printed label" "${questions[@]}" 2>/dev/null >>"$out"
    echo "($(( ($(date +%s%N) - start) / 1000000 )) ms, one thread)" >>"$out"
    echo >>"$out"
  done
  echo "$out: $(grep -c 'template: contradiction' "$out" || true) answer(s) refused for contradicting the findings" >&2
done
