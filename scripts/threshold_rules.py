#!/usr/bin/env python3
"""Compare image-threshold rules offline on an `anomalyd eval --json` report.

Each run in the report records its calibration sets (nuisance-view, held-out and simulated-anomaly
scores) and every test image's score, so any rule that uses only the calibration sets can be replayed
here without rerunning inference. Usage: scripts/threshold_rules.py report.json [...]
"""
import json
import statistics
import sys


def q(v, p):
    v = sorted(v)
    if not v:
        return float("nan")
    pos = p * (len(v) - 1)
    i = int(pos)
    t = pos - i
    return v[i] * (1 - t) + v[min(i + 1, len(v) - 1)] * t


def rules(run):
    n, h, a = run["calibration_normal"], run["calibration_held_out"], run["calibration_anomaly"]
    n_hi = max(n + h)
    out = {
        "current": run["image_threshold"],
        "midpoint of means (reference)": (statistics.mean(n) + statistics.mean(a)) / 2,
        "normal max": max(n),
        "held-out max": n_hi,
    }
    for qa in (0.1, 0.25, 0.5):
        lo = q(a, qa)
        out[f"mid(n_hi, a_q{qa})"] = 0.5 * (n_hi + lo) if lo > n_hi else n_hi * 1.05
    return out


for path in sys.argv[1:]:
    rep = json.load(open(path))
    for cat, runs in rep["runs"].items():
        table = {}
        for run in runs:
            imgs = run["images"]
            for name, t in rules(run).items():
                acc = sum((i["score"] >= t) == i["anomalous"] for i in imgs) / len(imgs)
                table.setdefault(name, []).append(acc)
        base = sum(i["anomalous"] for i in runs[0]["images"]) / len(runs[0]["images"])
        print(f"{cat}: flag-everything accuracy {base:.3f}")
        for name, accs in table.items():
            print(f"  {name:32s} " + " ".join(f"{a:.3f}" for a in accs) + f"  mean {statistics.mean(accs):.3f}")
        for run in runs:
            imgs = run["images"]
            good = [i["score"] for i in imgs if not i["anomalous"]]
            bad = [i["score"] for i in imgs if i["anomalous"]]
            print(f"  seed {run['seed']} {run['geometry']} stat {run['stationarity']:.2f}: test good q10/50/90 "
                  f"{q(good,.1):.3f}/{q(good,.5):.3f}/{q(good,.9):.3f}  bad q10/50/90 {q(bad,.1):.3f}/{q(bad,.5):.3f}/{q(bad,.9):.3f}  "
                  f"cal normal max {max(run['calibration_normal']):.3f} held {['%.3f' % v for v in run['calibration_held_out']]} "
                  f"anom q25/50 {q(run['calibration_anomaly'],.25):.3f}/{q(run['calibration_anomaly'],.5):.3f}")
