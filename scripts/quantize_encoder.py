#!/usr/bin/env python3
"""Statically quantise an encoder to int8 (QDQ: per-channel int8 weights, uint8 activations) with ONNX
Runtime's quantiser, calibrated on normal images, and write it beside the float model with its
manifest: models/<name>_int8.onnx and .json. anomalyd loads it with `engine.model` (or `--model`).

    python3 -m venv venvs/quantize && venvs/quantize/bin/pip install onnx onnxruntime==1.32.0 pillow numpy
    venvs/quantize/bin/python scripts/quantize_encoder.py --calib ../shared/datasets --per-category 16

Calibration takes the first `--per-category` images of every `train/good` folder under `--calib` (normal
parts only, as a plant would have), each resized to about 65,536 pixels at its own aspect ratio (the
default pixel budget), a multiple of 16 each side, and normalised as the manifest says.
"""
import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

MODELS = Path(__file__).resolve().parent.parent / "models"


def goods(root: Path, per: int) -> list[Path]:
    out = []
    for d in sorted(root.rglob("train/good")):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
        out += files[:per]
    return out


def tensor(path: Path, spec: dict, pixels: int = 65536) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = (pixels / (w * h)) ** 0.5
    w2, h2 = max(16, round(w * s / 16) * 16), max(16, round(h * s / 16) * 16)
    x = np.asarray(img.resize((w2, h2), Image.BILINEAR), dtype=np.float32) * spec["scale"]
    x = (x - np.array(spec["mean"], dtype=np.float32)) / np.array(spec["std"], dtype=np.float32)
    return x.transpose(2, 0, 1)[None].copy()


class Reader(CalibrationDataReader):
    def __init__(self, files, spec):
        self.items = iter([{spec["name"]: tensor(f, spec)} for f in files])

    def get_next(self):
        return next(self.items, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_lite0_s16")
    ap.add_argument("--calib", type=Path, required=True, help="a folder holding MVTec-layout categories")
    ap.add_argument("--per-category", type=int, default=16)
    a = ap.parse_args()
    manifest = json.loads((MODELS / f"{a.model}.json").read_text())
    src = MODELS / manifest["file"]
    files = goods(a.calib, a.per_category)
    if not files:
        raise SystemExit(f"no train/good images under {a.calib}")
    print(f"calibrating on {len(files)} normal images from {a.calib}")
    pre = MODELS / f"{a.model}_pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    out = MODELS / f"{a.model}_int8.onnx"
    quantize_static(str(pre), str(out), Reader(files, manifest["input"]), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    pre.unlink()
    m = dict(manifest)
    m["name"] = f"{a.model}_int8"
    m["file"] = out.name
    m["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    m["quantization"] = (f"static QDQ, int8 per-channel weights, uint8 activations (MinMax), ONNX Runtime's "
                         f"quantize_static, calibrated on {len(files)} train/good images "
                         f"({a.per_category} per category) of {a.calib.name}")
    (MODELS / f"{a.model}_int8.json").write_text(json.dumps(m, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes) and its manifest")


if __name__ == "__main__":
    main()
