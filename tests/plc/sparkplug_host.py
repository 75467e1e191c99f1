#!/usr/bin/env python3
"""A Sparkplug B primary host application, written with paho-mqtt and pysparkplug (Eclipse Tahu's
protobuf; not with anomalyd's code). Against a running anomalyd in Sparkplug mode it checks births,
deaths, bdSeq, seq, STATE, NCMD/DCMD and historical replays, and measures DCMD trigger to DDATA.

    sparkplug_host.py --port 1883 --group line1 --node edge --camera station --host scada \
        --http-port 9464 --token-file T --parts 100

Prints progress on stderr, "KILL" on stdout when the test should kill the daemon with SIGKILL (and start
it again), and finally one JSON line of results. Exits non-zero, saying why, on the first violation.
"""
import argparse
import json
import queue
import sys
import time
import urllib.request

import paho.mqtt.client as mqtt
from pysparkplug import DataType, DBirth, DCmd, DData, Metric, NBirth, NCmd, NDeath

WAIT_S = 90


def fail(why):
    print(f"FAIL: {why}", file=sys.stderr, flush=True)
    sys.exit(1)


def now_ms():
    return int(time.time() * 1000)


class Host:
    def __init__(self, args):
        self.a = args
        self.token = open(args.token_file).readline().strip()
        self.prefix = f"spBv1.0/{args.group}"
        self.state_topic = f"spBv1.0/STATE/{args.host}"
        self.events = queue.Queue()
        self.last_seq = None
        self.c = mqtt.Client(client_id=f"host-{args.host}", clean_session=True)
        self.c.will_set(self.state_topic, json.dumps({"online": False, "timestamp": now_ms()}), qos=1, retain=True)
        self.c.on_message = lambda _c, _u, m: self.events.put((m.topic, m.payload, time.monotonic()))
        self.online = False
        self.connects = 0
        self.replay_ok = False
        self.replayed = []
        self.deaths = []
        # As a primary host does on every (re)connect: subscribe, and say again that it is online.
        self.c.on_connect = lambda _c, _u, _f, _rc: self.on_connect()
        self.c.reconnect_delay_set(min_delay=1, max_delay=2)
        self.c.connect("127.0.0.1", args.port)
        self.c.loop_start()

    def on_connect(self):
        self.connects += 1
        self.c.subscribe(f"{self.prefix}/#", qos=1)
        self.c.subscribe(f"anomalyd/{self.a.node}/cmd/response", qos=1)
        self.c.subscribe(f"anomalyd/{self.a.node}/status", qos=1)
        if self.online:
            self.state(True)

    def state(self, online):
        self.online = online
        self.c.publish(self.state_topic, json.dumps({"online": online, "timestamp": now_ms()}), qos=1, retain=True)

    def topic(self, kind, device=None):
        t = f"{self.prefix}/{kind}/{self.a.node}"
        return f"{t}/{device}" if device else t

    def next(self, what, want=None):
        """The next message (topic, payload, t) matching `want`; fails after WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                fail(f"timed out waiting for {what}")
            try:
                m = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if want is None or want(m):
                return m
            if self.replay_ok and m[0] == self.topic("DDATA", self.a.camera):
                d = DData.decode(m[1])
                if all(x.is_historical for x in d.metrics):
                    # At least once: a verdict the killed daemon had sent but not seen acknowledged is
                    # sent again, as historical data, after its restart's births.
                    self.seq(d)
                    self.replayed.append(next(x.value for x in d.metrics if x.name == "Result/PartId"))
                    continue
            if self.replay_ok and m[0] == self.topic("NDEATH"):
                # The session the broker lost may still be declared dead, by its own bdSeq, on the
                # next connection (the node saw the host's will go out as the broker stopped).
                self.deaths.append(NDeath.decode(m[1]).bd_seq_metric.value)
                continue
            self.unexpected(m, what)

    def unexpected(self, m, what):
        topic = m[0]
        # Status and command replies may interleave; Sparkplug messages must come in the order asked.
        if topic.startswith(self.prefix) and "/DCMD/" not in topic and "/NCMD/" not in topic:
            fail(f"waiting for {what}, got {topic}")

    def seq(self, payload, reset=False):
        s = payload.seq
        if not 0 <= s <= 255:
            fail(f"seq {s} out of 0..255")
        if reset:
            if s != 0:
                fail(f"NBIRTH seq {s}, not 0")
        elif self.last_seq is not None and s != (self.last_seq + 1) % 256:
            fail(f"seq {s} after {self.last_seq}")
        self.last_seq = s

    def births(self, what):
        """NBIRTH then the camera's DBIRTH; returns (bdSeq, DBIRTH metrics by name)."""
        _, raw, _ = self.next(f"NBIRTH ({what})", lambda m: m[0] == self.topic("NBIRTH"))
        nb = NBirth.decode(raw)
        self.seq(nb, reset=True)
        m = {x.name: x for x in nb.metrics}
        if m["Node Control/Rebirth"].datatype != DataType.BOOLEAN or m["Node Control/Rebirth"].value is not False:
            fail(f"NBIRTH Node Control/Rebirth: {m['Node Control/Rebirth']}")
        if m["bdSeq"].datatype != DataType.INT64:
            fail(f"bdSeq datatype {m['bdSeq'].datatype}")
        _, raw, _ = self.next(f"DBIRTH ({what})", lambda m: m[0] == self.topic("DBIRTH", self.a.camera))
        db = DBirth.decode(raw)
        self.seq(db)
        metrics = {x.name: x for x in db.metrics}
        for name in ["Result/Verdict", "Result/Score", "Result/Threshold", "Result/PartId", "Result/Product",
                     "Result/Regions", "Result/FrameId", "Command/Trigger", "Command/Product"]:
            if name not in metrics:
                fail(f"DBIRTH lacks {name}")
            if metrics[name].datatype == DataType.UNKNOWN:
                fail(f"DBIRTH {name} has no datatype")
        return m["bdSeq"].value, metrics

    def death(self, what):
        _, raw, _ = self.next(f"NDEATH ({what})", lambda m: m[0] == self.topic("NDEATH"))
        d = NDeath.decode(raw)
        if d.bd_seq_metric.name != "bdSeq":
            fail(f"NDEATH metric {d.bd_seq_metric.name}")
        return d.bd_seq_metric.value

    def dcmd(self, metrics):
        p = DCmd(timestamp=now_ms(), metrics=tuple(metrics))
        self.c.publish(self.topic("DCMD", self.a.camera), p.encode(include_dtypes=True), qos=1)

    def trigger(self, part, token=True):
        ms = [Metric(timestamp=now_ms(), name="Command/Trigger", datatype=DataType.STRING, value=part)]
        if token:
            ms.append(Metric(timestamp=now_ms(), name="Command/Token", datatype=DataType.STRING, value=self.token))
        self.dcmd(ms)

    def ddata(self, what):
        _, raw, t = self.next(what, lambda m: m[0] == self.topic("DDATA", self.a.camera))
        d = DData.decode(raw)
        self.seq(d)
        return {x.name: x for x in d.metrics}, t

    def wait_ready(self):
        """Until anomalyd's /readyz answers 200: its cameras run (a trigger before that is refused)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.a.http_port}/readyz", timeout=5).status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                fail("anomalyd never became ready")
            time.sleep(0.05)

    def wait_outbox(self, n):
        """Until anomalyd's /metrics says n verdicts wait in its outbox."""
        deadline = time.monotonic() + WAIT_S
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.a.http_port}/metrics", timeout=5).read().decode()
            waiting = [float(l.split()[-1]) for l in text.splitlines() if l.startswith("anomalyd_outbox_verdicts ")]
            if waiting and waiting[0] >= n:
                return
            if time.monotonic() > deadline:
                fail(f"the outbox never held {n} verdicts: {waiting}")
            time.sleep(0.05)

    def response(self, what):
        _, raw, _ = self.next(what, lambda m: m[0].endswith("/cmd/response"))
        return json.loads(raw)


def main():
    ap = argparse.ArgumentParser()
    for k in ["group", "node", "camera", "host", "token-file"]:
        ap.add_argument(f"--{k}", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--parts", type=int, default=100)
    h = Host(ap.parse_args())
    a = h.a
    out = {}

    # 1. The host comes online; the node, which waits for it, is born.
    h.state(True)
    bd0, _ = h.births("first connect")
    out["bd_seq_first"] = bd0
    h.wait_ready()

    # 2. Parts triggered by DCMD, one at a time, each answered by one live DDATA.
    latencies = []
    for i in range(a.parts):
        part = f"SP-{i:04d}"
        t0 = time.monotonic()
        h.trigger(part)
        m, t = h.ddata(f"the DDATA of {part}")
        latencies.append((t - t0) * 1000)
        if m["Result/PartId"].value != part:
            fail(f"DDATA for {m['Result/PartId'].value}, expected {part}")
        if m["Result/Verdict"].value not in ("OK", "NG"):
            fail(f"{part}: verdict {m['Result/Verdict'].value}")
        if m["Result/Verdict"].is_historical:
            fail(f"{part}: a live result marked historical")
        if m["Result/Score"].datatype != DataType.FLOAT or m["Result/Threshold"].value is None:
            fail(f"{part}: score {m['Result/Score']}, threshold {m['Result/Threshold']}")
    latencies.sort()
    out["parts"] = a.parts
    out["trigger_to_ddata_ms"] = {
        "p50": round(latencies[len(latencies) // 2], 1),
        "p99": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
    }
    out["parts_per_s"] = round(a.parts / (sum(latencies) / 1000), 1)
    print(f"{a.parts} parts: trigger to DDATA {out['trigger_to_ddata_ms']}", file=sys.stderr, flush=True)

    # 3. Refusals: no token, a wrong type, an unknown metric. Each is answered on the JSON response topic.
    h.trigger("NO-TOKEN", token=False)
    out["no_token"] = h.response("the refusal of a trigger without a token")["reason"]
    h.dcmd([Metric(timestamp=now_ms(), name="Command/Trigger", datatype=DataType.INT32, value=7),
            Metric(timestamp=now_ms(), name="Command/Token", datatype=DataType.STRING, value=h.token)])
    out["wrong_type"] = h.response("the refusal of an Int32 trigger")["reason"]
    h.dcmd([Metric(timestamp=now_ms(), name="Command/Explode", datatype=DataType.BOOLEAN, value=True)])
    out["unknown_metric"] = h.response("the refusal of an unknown metric")["reason"]
    h.c.publish(h.topic("NCMD"), b"\xff\x00not a protobuf", qos=1)
    out["malformed_ncmd"] = h.response("the refusal of a malformed NCMD")["reason"]

    # 4. Rebirth on request: NBIRTH seq 0, the same bdSeq, the camera's last result in its DBIRTH.
    h.c.publish(h.topic("NCMD"), NCmd(timestamp=now_ms(), metrics=(
        Metric(timestamp=now_ms(), name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=True),)).encode(include_dtypes=True), qos=1)
    bd, metrics = h.births("rebirth")
    if bd != bd0:
        fail(f"a rebirth changed bdSeq {bd0} -> {bd}")
    out["rebirth_last_part"] = metrics["Result/PartId"].value

    # 5. The host goes offline: the node dies (same bdSeq) and reconnects without being born. Parts
    # triggered meanwhile wait in its outbox and come as historical data after the host is back.
    h.state(False)
    out["offline_death_bd_seq"] = h.death("the host went offline")
    h.next("the node's reconnect (its JSON status)", lambda m: m[0].endswith("/status") and m[1] == b"online")
    for i in range(3):
        h.trigger(f"OFF-{i}")
    h.wait_outbox(3)
    h.state(True)
    bd1, _ = h.births("the host is back")
    out["bd_seq_after_reconnect"] = bd1
    held = []
    for i in range(3):
        m, _ = h.ddata(f"the held result OFF-{i}")
        held.append([m["Result/PartId"].value, m["Result/Verdict"].is_historical])
    out["held"] = held

    # 6. The daemon is killed: the broker publishes its will, the NDEATH of its bdSeq. Restarted, it is
    # born with the next bdSeq, kept on disk.
    print("KILL", flush=True)
    out["will_bd_seq"] = h.death("the will of the killed daemon")
    h.last_seq = None
    bd2, _ = h.births("the restarted daemon")
    out["bd_seq_after_restart"] = bd2
    h.wait_ready()

    # 7. The broker restarts (its sessions and retained messages gone): the host reconnects and says
    # online again; the node reconnects with the next bdSeq and is born again; parts go on in seq order.
    h.replay_ok = True
    print("RESTART_BROKER", flush=True)
    connects = h.connects
    h.last_seq = None
    bd3, _ = h.births("after the broker restarted")
    h.replay_ok = False
    out["replayed_after_kill"] = h.replayed
    out["deaths_after_broker_restart"] = h.deaths
    out["bd_seq_after_broker_restart"] = bd3
    out["host_reconnected"] = h.connects > connects
    h.wait_ready()
    after = []
    for i in range(3):
        h.trigger(f"BR-{i}")
        m, _ = h.ddata(f"the DDATA of BR-{i}")
        after.append([m["Result/PartId"].value, m["Result/Verdict"].is_historical])
    out["after_broker_restart"] = after
    h.c.loop_stop()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
