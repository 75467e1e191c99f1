#!/usr/bin/env python3
"""A PLC on Modbus TCP, written with pymodbus (not with anomalyd's code): it drives anomalyd's
trigger/acknowledge handshake (docs/PLC.md) for N parts as fast as anomalyd answers, then tries what a
PLC must be refused for. Prints one JSON line of results and figures; tests/plc.rs checks them.

    modbus_plc.py --port 5020 --unit 1 --parts 200
"""
import argparse
import json
import struct
import sys
import time

from pymodbus.client import ModbusTcpClient

COIL_TRIGGER, COIL_ACK, COIL_SELECT = 0, 1, 2
(DI_READY, DI_TRIGGER_ACK, DI_BUSY, DI_RESULT_READY, DI_OK, DI_NG, DI_ERROR, DI_TRIGGER_REFUSED,
 DI_RECIPE_REFUSED) = range(9)
HR_PART, HR_PRODUCT, HR_CONTROL, HR_MIRROR = 0, 16, 32, 100
IR_SEQ, IR_VERDICT, IR_SCORE, IR_THRESHOLD, IR_REGIONS, IR_STATUS = 0, 2, 3, 5, 7, 8
IR_FRAME_SEQ, IR_LATENCY, IR_PART, IR_PRODUCT, IR_RECIPE, IR_REFUSAL = 9, 11, 12, 28, 44, 60
VERDICTS = {0: None, 1: "OK", 2: "NG", 3: "SKIPPED", 4: "ERROR"}
POLL_S = 0.002  # a PLC scan of 2 ms


def text_regs(s):
    b = s.encode().ljust(32, b"\0")[:32]
    return [b[i] << 8 | b[i + 1] for i in range(0, 32, 2)]


def regs_text(regs):
    return b"".join(r.to_bytes(2, "big") for r in regs).split(b"\0")[0].decode()


def f32(hi, lo):
    return struct.unpack(">f", struct.pack(">HH", hi, lo))[0]


class Plc:
    def __init__(self, port, unit):
        self.c = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
        t0 = time.perf_counter()
        while not self.c.connect():  # as a PLC does, until anomalyd listens
            if time.perf_counter() - t0 > 120:
                raise SystemExit(f"cannot connect to 127.0.0.1:{port}")
            time.sleep(0.2)
        self.unit = unit

    def ok(self, rr):
        if rr.isError():
            raise RuntimeError(f"unexpected Modbus error: {rr}")
        return rr

    def bits(self):
        return self.ok(self.c.read_discrete_inputs(0, count=9, device_id=self.unit)).bits[:9]

    def wait(self, pred, what, timeout=60.0):
        t0 = time.perf_counter()
        while True:
            b = self.bits()
            if pred(b):
                return b
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"timed out waiting for {what}; discrete inputs {b}")
            time.sleep(POLL_S)

    def coil(self, n, v):
        self.ok(self.c.write_coil(n, v, device_id=self.unit))

    def result(self):
        r = self.ok(self.c.read_input_registers(0, count=61, device_id=self.unit)).registers
        return {
            "seq": r[IR_SEQ] << 16 | r[IR_SEQ + 1],
            "verdict": VERDICTS.get(r[IR_VERDICT]),
            "score": f32(r[IR_SCORE], r[IR_SCORE + 1]),
            "threshold": f32(r[IR_THRESHOLD], r[IR_THRESHOLD + 1]),
            "regions": r[IR_REGIONS],
            "frame_seq": r[IR_FRAME_SEQ] << 16 | r[IR_FRAME_SEQ + 1],
            "server_ms": r[IR_LATENCY],
            "part_id": regs_text(r[IR_PART:IR_PART + 16]),
            "product": regs_text(r[IR_PRODUCT:IR_PRODUCT + 16]),
            "recipe": regs_text(r[IR_RECIPE:IR_RECIPE + 16]),
            "refusal": r[IR_REFUSAL],
        }

    def trigger(self, part_id, product=""):
        """Sets the part's registers and raises Trigger; returns (accepted, refusal code)."""
        self.ok(self.c.write_registers(HR_PART, text_regs(part_id), device_id=self.unit))
        self.ok(self.c.write_registers(HR_PRODUCT, text_regs(product), device_id=self.unit))
        self.coil(COIL_TRIGGER, True)
        b = self.wait(lambda b: b[DI_TRIGGER_ACK] or b[DI_TRIGGER_REFUSED], "TriggerAck or TriggerRefused")
        refusal = self.result()["refusal"] if b[DI_TRIGGER_REFUSED] else 0
        self.coil(COIL_TRIGGER, False)
        self.wait(lambda b: not b[DI_TRIGGER_ACK] and not b[DI_TRIGGER_REFUSED], "the trigger bits to clear")
        return b[DI_TRIGGER_ACK], refusal

    def ack(self):
        self.coil(COIL_ACK, True)
        self.wait(lambda b: not b[DI_RESULT_READY], "ResultReady to clear")
        self.coil(COIL_ACK, False)

    def part(self, part_id, product=""):
        t0 = time.perf_counter()
        accepted, refusal = self.trigger(part_id, product)
        if not accepted:
            raise RuntimeError(f"part {part_id} refused with code {refusal}")
        b = self.wait(lambda b: b[DI_RESULT_READY], "ResultReady")
        took = time.perf_counter() - t0
        res = self.result()
        res["bits"] = {"ok": b[DI_OK], "ng": b[DI_NG], "error": b[DI_ERROR]}
        self.ack()
        return res, took

    def exception(self, rr):
        return rr.exception_code if rr.isError() and hasattr(rr, "exception_code") else None


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--unit", type=int, default=1)
    ap.add_argument("--parts", type=int, default=200)
    a = ap.parse_args()
    plc = Plc(a.port, a.unit)
    plc.wait(lambda b: b[DI_READY], "Ready", timeout=180)
    out = {"parts": [], "checks": {}}

    # The handshake, part after part, as fast as anomalyd answers.
    t0 = time.perf_counter()
    took = []
    for i in range(a.parts):
        res, t = plc.part(f"MB-{i:04d}")
        took.append(t * 1e3)
        out["parts"].append({k: res[k] for k in ("part_id", "seq", "verdict", "frame_seq", "server_ms", "bits")})
    wall = time.perf_counter() - t0
    out["rate_parts_per_s"] = a.parts / wall
    out["trigger_to_result_ms"] = {"p50": pct(took, 0.5), "p99": pct(took, 0.99), "max": max(took)}
    server = [p["server_ms"] for p in out["parts"]]
    out["server_trigger_to_result_ms"] = {"p50": pct(server, 0.5), "p99": pct(server, 0.99)}

    # A trigger while a result waits for its acknowledgement: refused (Busy), and the result stays.
    accepted, _ = plc.trigger("BUSY-1")
    plc.wait(lambda b: b[DI_RESULT_READY], "ResultReady")
    second, refusal = plc.trigger("BUSY-2")
    kept = plc.result()
    plc.ack()
    out["checks"]["busy"] = {"first": accepted, "second": second, "refusal": refusal,
                             "kept_part": kept["part_id"], "kept_seq": kept["seq"]}

    # A part of a product the camera has no recipe for: an Error result, with the product echoed.
    res, _ = plc.part("UNK-1", "bolt")
    out["checks"]["unknown_product"] = {"verdict": res["verdict"], "product": res["product"],
                                        "error_bit": res["bits"]["error"]}

    # SelectRecipe with an unknown product: RecipeRefused, reason 6; with a malformed one: reason 3.
    plc.ok(plc.c.write_registers(HR_PRODUCT, text_regs("bolt"), device_id=a.unit))
    plc.coil(COIL_SELECT, True)
    b = plc.bits()
    unknown = (b[DI_RECIPE_REFUSED], plc.result()["refusal"])
    plc.coil(COIL_SELECT, False)
    plc.ok(plc.c.write_registers(HR_PRODUCT, text_regs("a/b"), device_id=a.unit))
    plc.coil(COIL_SELECT, True)
    malformed = (plc.bits()[DI_RECIPE_REFUSED], plc.result()["refusal"])
    plc.coil(COIL_SELECT, False)
    out["checks"]["select_unknown"] = list(unknown)
    out["checks"]["select_malformed"] = list(malformed)

    # Writes to the read-only result mirror and outside the map, a control word with unknown bits, a
    # unit with no camera, a function anomalyd does not serve: exceptions, and the link stays up.
    c = plc.c
    out["checks"]["exceptions"] = {
        "write_read_only": plc.exception(c.write_register(HR_MIRROR, 1, device_id=a.unit)),
        "write_outside": plc.exception(c.write_register(500, 1, device_id=a.unit)),
        "read_outside": plc.exception(c.read_input_registers(60, count=5, device_id=a.unit)),
        "bad_control": plc.exception(c.write_register(HR_CONTROL, 0x8000, device_id=a.unit)),
        "unknown_unit": plc.exception(c.read_coils(0, count=1, device_id=a.unit + 40)),
        "unserved_function": plc.exception(c.read_fifo_queue(address=0, device_id=a.unit)),
    }
    out["checks"]["still_ready"] = plc.bits()[DI_READY]
    # The last result stays readable through the mirror too.
    mirror = plc.ok(c.read_holding_registers(HR_MIRROR, count=3, device_id=a.unit)).registers
    out["checks"]["mirror_seq"] = mirror[0] << 16 | mirror[1]
    out["checks"]["last_seq"] = plc.result()["seq"]
    plc.c.close()
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one line for the test's failure message
        print(f"PLC script failed: {e!r}", file=sys.stderr)
        raise
