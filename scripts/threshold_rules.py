#!/usr/bin/env python3
"""Replay image-threshold rules offline on an `anomalyd eval --json` report.

Each run in the report records its calibration sets (nuisance-view, held-out and simulated-anomaly scores)
and every test image's score, so any rule that uses only the calibration sets can be replayed here without
rerunning inference. `current` is the rule of src/enrol/calibrate.rs (choose_image_threshold) written
again in Python; the others are the alternatives docs/CALIBRATION.md reports.

Usage: scripts/threshold_rules.py report.json [...] [--write RULE OUT.json]
  prints, per rule and category, FRR / escape / best escape at the report's false-reject target;
  --write re-judges every image of the first report with RULE and writes it (for calib-check.py).
"""
import json
import math
import statistics as st
import sys

MIN_SPREAD = 0.01
MIN_HELD_OUT_FOR_SPREAD = 4
OUTLIER_SIGMAS = 3.0
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 8: 1.860, 10: 1.812, 20: 1.725, 50: 1.676}


def z(p):
    return st.NormalDist().inv_cdf(p)


def mad_sd(v):
    m = st.median(v)
    return 1.4826 * st.median([abs(x - m) for x in v])


def fit(v, floor):
    """NormalModel::fit: median and normalised MAD, high outliers set aside until nothing changes."""
    keep = list(v)
    m, s = st.median(keep), max(mad_sd(keep), floor)
    while True:
        nxt = [x for x in v if x <= m + OUTLIER_SIGMAS * s]
        if len(nxt) == len(keep) or not nxt:
            return m, s
        keep = nxt
        m, s = st.median(keep), max(mad_sd(keep), floor)


def current(n, h, f):
    if len(h) >= MIN_HELD_OUT_FOR_SPREAD:
        m, s = fit(h, MIN_SPREAD)
    elif len(h) >= 2:
        m, s = fit(h, max(fit(n, MIN_SPREAD)[1], MIN_SPREAD))
    else:
        m, s = fit(n + h, MIN_SPREAD)
    return math.exp(m + z(1 - f) * s)


def nuisance_floor(n, h, f):
    """The first version: the nuisance views' spread floors every model."""
    m, s = fit(h if len(h) >= 2 else n + h, max(fit(n, MIN_SPREAD)[1], MIN_SPREAD))
    return math.exp(m + z(1 - f) * s)


def predictive(n, h, f):
    """Mean and standard deviation of the inliers, widened to a Student-t predictive quantile."""
    v = h if len(h) >= 2 else n + h
    m, s = fit(v, MIN_SPREAD)
    keep = [x for x in v if x <= m + OUTLIER_SIGMAS * s]
    if len(keep) >= 2:
        m, s = st.mean(keep), max(st.stdev(keep), MIN_SPREAD)
    df = len(keep) - 1
    t = next((T95[k] for k in sorted(T95) if df <= k), z(0.95)) if f == 0.05 else z(1 - f)
    return math.exp(m + t * math.sqrt(1 + 1 / len(keep)) * s)


RULES = {"current": current, "nuisance floor": nuisance_floor, "predictive t": predictive}


def threshold(rule, run, f):
    n = [math.log(x) for x in run["calibration_normal"] if x > 0]
    h = [math.log(x) for x in run["calibration_held_out"] if x > 0]
    return RULES[rule](n, h, f)


def judge(images, t, f):
    good = sorted(x["score"] for x in images if not x["anomalous"])
    bad = [x["score"] for x in images if x["anomalous"]]
    frr = sum(s >= t for s in good) / len(good)
    esc = sum(s < t for s in bad) / len(bad)
    k = math.floor(f * len(good) + 1e-9)
    best = sum(s <= good[len(good) - 1 - k] for s in bad) / len(bad)
    return frr, esc, best, len(good)


def main():
    args = sys.argv[1:]
    write = None
    if "--write" in args:
        i = args.index("--write")
        write = (args[i + 1], args[i + 2])
        args = args[:i] + args[i + 3:]
    for path in args:
        rep = json.load(open(path))
        f = rep.get("false_reject_target") or 0.05
        for rule in RULES:
            cols = []
            for cat, runs in rep["runs"].items():
                r = [judge(run["images"], threshold(rule, run, f), f) for run in runs]
                frr, esc, best = (st.mean(x[i] for x in r) for i in range(3))
                fid = frr <= 2 * f + 1 / r[0][3] + 1e-9
                cols.append(f"{cat}: FRR {frr:.2f}{'' if fid else '!'} escape {esc:.2f}"
                            f"{'' if esc <= best + 0.05 + 1e-9 else '!'} best {best:.2f}")
            print(f"{path} [{rule}] " + " | ".join(cols))
    if write:
        rule, out = write
        rep = json.load(open(args[0]))
        f = rep.get("false_reject_target") or 0.05
        for runs in rep["runs"].values():
            for run in runs:
                t = threshold(rule, run, f)
                run["image_threshold"] = t
                for im in run["images"]:
                    im["verdict"] = im["score"] >= t
        json.dump(rep, open(out, "w"))
        print(f"wrote {out} (every verdict re-judged with [{rule}])")


if __name__ == "__main__":
    main()
