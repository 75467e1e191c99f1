"""An OPC UA client built on asyncua (a project of its own, not anomalyd's) that drives anomalyd's
OPC UA server the way a PLC or SCADA system would, and prints what it saw as JSON.

    opcua_client.py make-cert DIR            a client key and certificate (DER) into DIR
    opcua_client.py run --url URL --user U --password-file F --cert C --key K --pki DIR --parts N
    opcua_client.py watch (the same options)   a SCADA client's load, until killed

`run` is first refused (the server files its certificate under rejected/), trusts it as an
integrator would (moves it to trusted/), then checks that anonymous and wrong-password sessions are refused, logs in over Basic256Sha256
SignAndEncrypt, browses the camera's node tree, subscribes to its ResultReady events, calls
SelectRecipe and Trigger (bad arguments too), and for each part waits for its event and reads the
Result variables back. Latencies are from the Trigger call to the event's arrival.
"""

import argparse
import asyncio
import json
import socket
import statistics
import time
from pathlib import Path

from asyncua import Client, ua
from asyncua.common.events import get_filter_from_event_type
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID

APP_URI = "urn:anomalyd-tests:opcua-client"
NS = "urn:anomalyd"


async def make_cert(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    await setup_self_signed_certificate(
        folder / "client_key.pem",
        folder / "client_cert.der",
        APP_URI,
        socket.gethostname(),
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        {"commonName": "anomalyd-tests"},
    )


def client(args, user=None, password=None) -> Client:
    c = Client(args.url, timeout=10)
    c.application_uri = APP_URI
    if user is not None:
        c.set_user(user)
        c.set_password(password)
    return c


async def secure(c: Client, args) -> None:
    await c.set_security(SecurityPolicyBasic256Sha256, args.cert, args.key, mode=ua.MessageSecurityMode.SignAndEncrypt)


async def refused(args, user=None, password=None) -> str:
    """The error a session with these credentials gets, or "" when it is let in."""
    c = client(args, user, password)
    await secure(c, args)
    try:
        await c.connect()
    except Exception as e:  # asyncua raises the server's status as an exception
        return type(e).__name__ + ": " + str(e)[:120]
    await c.disconnect()
    return ""


async def cert_login(args, cert: str, key: str) -> str:
    """The error a session that logs in with this user certificate gets, or "" when it is let in and
    can read its camera's state."""
    c = client(args)
    await secure(c, args)
    await c.load_client_certificate(cert)
    await c.load_private_key(Path(key))
    try:
        await c.connect()
    except Exception as e:
        return type(e).__name__ + ": " + str(e)[:120]
    try:
        ns = await c.get_namespace_index(NS)
        await c.get_node(ua.NodeId(f"{args.camera}.State", ns)).read_value()
    finally:
        await c.disconnect()
    return ""


async def status_of(coro) -> str:
    try:
        out = await coro
        return "Good:" + json.dumps(out)
    except ua.UaStatusCodeError as e:
        return ua.StatusCode(e.code).name


class Events:
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def event_notification(self, event):
        self.queue.put_nowait((time.perf_counter(), event.get_event_props_as_fields_dict()))


def field(props: dict, name: str):
    v = props[name]
    return v.Value


async def connect(args, out: dict) -> tuple[Client, str]:
    """A session as `args.user`, retried while the daemon starts; an unknown client certificate,
    once refused and filed under rejected/, is trusted as an integrator would."""
    password = Path(args.password_file).read_text().splitlines()[0]
    deadline = time.monotonic() + 90
    while True:  # the daemon is starting: its port opens, then its cameras load
        c = client(args, args.user, password)
        try:
            await secure(c, args)
            await c.connect()
            return c, password
        except (OSError, asyncio.TimeoutError, ua.UaError) as e:
            if time.monotonic() > deadline:
                raise
            rejected = sorted(Path(args.pki, "rejected").glob("*.der"))
            if "BadSecurityChecksFailed" in repr(e) and rejected:
                for f in rejected:
                    f.rename(Path(args.pki, "trusted", f.name))
                out["trusted_after_rejection"] = [f.name for f in rejected]
                continue
            await asyncio.sleep(0.2)


async def camera(c: Client, name: str) -> tuple[int, object, dict]:
    """The camera's node once it is streaming, found by browsing as an engineering tool would."""
    ns = await c.get_namespace_index(NS)
    deadline = time.monotonic() + 90
    while True:
        cams = {}
        for child in await c.nodes.objects.get_children():
            if (await child.read_browse_name()).Name == "anomalyd":
                cams = {(await n.read_browse_name()).Name: n for n in await child.get_children()}
        cam = cams.get(name)
        if cam is not None and await (await cam.get_child([f"{ns}:State"])).read_value() == "streaming":
            return ns, cam, cams
        if time.monotonic() > deadline:
            raise TimeoutError("the camera never came up")
        await asyncio.sleep(0.1)


async def subscribe(c: Client, ns: int, cam, handler, interval_ms: int = 10):
    """ResultReady events of the camera, with an OfType where clause as node-opcua and UaExpert build
    it. (asyncua's own default, InList on EventType, compares NodeIds, which async-opcua 0.19's filter
    does not: docs/PLC.md.)"""
    evtype = c.get_node(ua.NodeId("ResultReadyEventType", ns))
    sub = await c.create_subscription(interval_ms, handler)
    evfilter = await get_filter_from_event_type([evtype], where_clause_generation=False)
    of_type = ua.ContentFilterElement(
        FilterOperator=ua.FilterOperator.OfType, FilterOperands=[ua.LiteralOperand(Value=ua.Variant(evtype.nodeid))]
    )
    evfilter.WhereClause = ua.ContentFilter(Elements=[of_type])
    await sub.subscribe_events(cam, evtype, evfilter=evfilter)
    return sub, evtype


async def watch(args) -> None:
    """A SCADA client's load: every ResultReady event and every Result variable's change, until killed."""
    c, _ = await connect(args, {})
    ns, cam, _ = await camera(c, args.camera)

    class Count:
        events = 0
        changes = 0

        def event_notification(self, event):
            Count.events += 1

        def datachange_notification(self, node, val, data):
            Count.changes += 1

    sub, _ = await subscribe(c, ns, cam, Count())
    result = await cam.get_child([f"{ns}:Result"])
    await sub.subscribe_data_change(await result.get_children())
    print("watching", flush=True)
    while True:
        await asyncio.sleep(1)


async def run(args) -> dict:
    out: dict = {"checks": {}}
    checks = out["checks"]
    c, password = await connect(args, out)
    try:
        ns, cam, cams = await camera(c, args.camera)
        out["cameras"] = sorted(cams)
        checks["anonymous_refused"] = await refused(args)
        checks["wrong_password_refused"] = await refused(args, args.user, password + "x")
        checks["unknown_user_refused"] = await refused(args, "nobody", password)
        if args.user_cert:
            checks["x509_user"] = await cert_login(args, args.user_cert, args.user_key)
            # The application certificate is not a configured user certificate.
            checks["x509_unknown_refused"] = await cert_login(args, args.cert, args.key)
        names = sorted([(await n.read_browse_name()).Name for n in await cam.get_children()])
        out["camera_children"] = names
        result = await cam.get_child([f"{ns}:Result"])
        out["result_children"] = sorted([(await n.read_browse_name()).Name for n in await result.get_children()])
        out["state"] = await (await cam.get_child([f"{ns}:State"])).read_value()
        out["recipes"] = await (await cam.get_child([f"{ns}:Recipes"])).read_value()

        handler = Events()
        sub, evtype = await subscribe(c, ns, cam, handler)
        out["event_type_browse_name"] = (await evtype.read_browse_name()).Name
        subtypes = [(await n.read_browse_name()).Name for n in await c.nodes.base_event_type.get_children()]
        out["event_type_under_base"] = "ResultReadyEventType" in subtypes

        trigger = f"{ns}:Trigger"
        select = f"{ns}:SelectRecipe"
        checks["select_plate"] = await status_of(cam.call_method(select, "plate"))
        checks["active_after_select"] = await (await cam.get_child([f"{ns}:ActiveRecipe"])).read_value()
        checks["select_unknown"] = await status_of(cam.call_method(select, "bolt"))
        checks["select_malformed"] = await status_of(cam.call_method(select, "a/b"))
        checks["select_no_argument"] = await status_of(cam.call_method(select))
        checks["select_wrong_type"] = await status_of(cam.call_method(select, ua.Variant(7, ua.VariantType.Int32)))
        checks["trigger_too_many"] = await status_of(cam.call_method(trigger, "P", "", "x"))
        checks["trigger_bad_part"] = await status_of(cam.call_method(trigger, "bad\npart", ""))
        checks["trigger_made_id"] = await status_of(cam.call_method(trigger, "", ""))

        async def part(part_id: str, product: str):
            t0 = time.perf_counter()
            answer = await cam.call_method(trigger, part_id, product)
            while True:
                t, props = await asyncio.wait_for(handler.queue.get(), 30)
                if field(props, "PartId") == part_id:
                    return answer, (t - t0) * 1e3, props

        parts = []
        lat = []
        for i in range(args.parts):
            pid = f"UA-{i:04d}"
            answer, ms, props = await part(pid, "")
            lat.append(ms)
            values = {n: await (await result.get_child([f"{ns}:{n}"])).read_value() for n in out["result_children"]}
            parts.append(
                {
                    "answer": answer,
                    "event": {k: field(props, k) for k in ["ResultSeq", "ResultId", "PartId", "ProductId", "Verdict", "Regions"]},
                    "event_score": field(props, "Score"),
                    "source_name": field(props, "SourceName"),
                    "read": {k: values[k] for k in ["ResultSeq", "ResultId", "PartId", "ProductId", "Verdict", "Regions"]},
                    "read_score": values["Score"],
                    "ms": ms,
                }
            )
        out["parts"] = parts
        answer, _, props = await part("UA-BOLT", "bolt")
        checks["unknown_product"] = {"answer": answer, "verdict": field(props, "Verdict"), "product": field(props, "ProductId")}
        lat.sort()
        out["trigger_to_event_ms"] = {
            "p50": statistics.median(lat),
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "max": lat[-1],
        }
        await sub.delete()
    finally:
        await c.disconnect()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    m = sp.add_parser("make-cert")
    m.add_argument("dir")
    for name in ["run", "watch"]:
        r = sp.add_parser(name)
        add_session_args(r)
    args = p.parse_args()
    if args.cmd == "make-cert":
        asyncio.run(make_cert(Path(args.dir)))
    elif args.cmd == "watch":
        asyncio.run(watch(args))
    else:
        print(json.dumps(asyncio.run(run(args))))


def add_session_args(r) -> None:
    r.add_argument("--url", required=True)
    r.add_argument("--user", required=True)
    r.add_argument("--password-file", required=True)
    r.add_argument("--cert", required=True)
    r.add_argument("--key", required=True)
    r.add_argument("--pki", required=True, help="the server's certificate folder (trusted/, rejected/)")
    r.add_argument("--camera", default="station")
    r.add_argument("--parts", type=int, default=50)
    r.add_argument("--user-cert", help="a user certificate configured in [[opcua.user]] (with --user-key)")
    r.add_argument("--user-key")


if __name__ == "__main__":
    main()
