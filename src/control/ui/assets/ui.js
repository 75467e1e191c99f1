// The operator station's only script: live tiles (server-sent events), the heat-map and box toggles,
// asking about a frame without leaving the page, and drawing regions on a frame. Every page works
// without it, but the live tiles (regions can be typed into their text box).
"use strict";

function csrf() {
  const m = document.querySelector('meta[name="csrf"]');
  return m ? m.content : "";
}

function fmt(x, digits) {
  return x === null || x === undefined ? "—" : Number(x).toFixed(digits);
}

function liveTiles(root) {
  const source = new EventSource(root.dataset.live);
  // Leaving the page ends the stream at once (a page kept for the back button must not hold it).
  window.addEventListener("pagehide", () => source.close());
  source.addEventListener("tile", (ev) => {
    const t = JSON.parse(ev.data);
    const tile = document.getElementById("tile-" + t.camera);
    if (!tile) {
      // A camera that started (or was added by a reload) after the page was made: make the page again.
      if (!window.reloading) { window.reloading = true; setTimeout(() => location.reload(), 500); }
      return;
    }
    const f = (name) => tile.querySelector('[data-f="' + name + '"]');
    const last = t.last || {};
    f("verdict").textContent = last.verdict || "no frame yet";
    f("verdict").className = "verdict v-" + (last.verdict || "none");
    f("ok").textContent = t.ok;
    f("ng").textContent = t.ng;
    f("ng_rate").textContent = (t.ng_rate * 100).toFixed(1) + "%";
    f("fps").textContent = fmt(t.fps, 1);
    f("skipped_error").textContent = t.skipped + " / " + t.error;
    f("recipe").textContent = t.recipe || "—";
    f("trigger").textContent = t.trigger;
    f("score").textContent = fmt(last.score, 4) + " / " + fmt(last.threshold, 4);
    f("answer").textContent = last.answer || last.reason || "";
    if (t.last_ng && tile.dataset.lastNg !== t.last_ng) {
      tile.dataset.lastNg = t.last_ng;
      f("link").href = "/ui/frames/" + t.last_ng;
      // The store writes the overlay on its own thread: retry a few times if it is not there yet.
      const img = f("picture");
      let tries = 0;
      img.onerror = () => { if (tries++ < 10) setTimeout(() => { img.src = "/ui/frames/" + t.last_ng + "/overlay?t=" + tries; }, 200); };
      img.src = "/ui/frames/" + t.last_ng + "/overlay";
    }
    // From the verdict (capture time plus its latency) to this update, on this page's clock.
    const ms = Math.round(Date.now() - (last.captured_unix_ms + last.latency_ms.total));
    tile.dataset.updateMs = ms;
    f("age").textContent = ms + " ms after the verdict";
  });
}

function toggles() {
  const view = document.getElementById("view");
  if (!view) return;
  const img = document.getElementById("picture");
  const heat = document.getElementById("toggle-heat");
  heat.addEventListener("click", () => {
    const on = heat.getAttribute("aria-pressed") !== "true";
    heat.setAttribute("aria-pressed", on);
    heat.textContent = "Heat map: " + (on ? "on" : "off");
    img.src = on ? img.dataset.overlay : img.dataset.image;
  });
  const boxes = document.getElementById("toggle-boxes");
  boxes.addEventListener("click", () => {
    const on = boxes.getAttribute("aria-pressed") !== "true";
    boxes.setAttribute("aria-pressed", on);
    boxes.textContent = "Boxes: " + (on ? "on" : "off");
    view.classList.toggle("no-boxes", !on);
  });
}

function ask() {
  const form = document.getElementById("ask");
  if (!form) return;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const q = form.querySelector('[name="question"]');
    const li = document.createElement("li");
    li.innerHTML = "<b></b><br><span class=answer>…</span>";
    li.querySelector("b").textContent = q.value;
    document.getElementById("chat").appendChild(li);
    const body = new URLSearchParams({ csrf: csrf(), question: q.value });
    q.value = "";
    const res = await fetch(form.action, { method: "POST", body, headers: { Accept: "text/event-stream" } });
    const out = li.querySelector(".answer");
    if (!res.ok) { out.textContent = await res.text(); out.className = "error"; return; }
    // The answer arrives as server-sent events, a piece at a time.
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = "", text = "", pieces = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const ev = /^event: (.*)$/m.exec(block);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (ev && ev[1] === "piece") { text += JSON.parse(data); out.textContent = text; li.dataset.pieces = ++pieces; }
        if (ev && ev[1] === "done") { const a = JSON.parse(data); out.textContent = a.answer; li.dataset.source = a.source; }
        if (ev && ev[1] === "error") { out.textContent = JSON.parse(data); out.className = "error"; }
      }
    }
    li.classList.add("answered");
  });
}

// Regions: taps on the frame add corners to the open polygon; a button closes it as a region to ignore
// or to inspect. The text box holds every closed region as JSON (fractions of the frame) and is what the
// form sends, so typing into it works too.
function drawZones() {
  const svg = document.getElementById("canvas");
  const box = document.getElementById("zones");
  if (!svg || !box) return;
  const view = document.getElementById("draw-view");
  const [w, h] = [Number(view.dataset.w), Number(view.dataset.h)];
  let open = [];
  const zones = () => { try { const z = JSON.parse(box.value || "[]"); return Array.isArray(z) ? z : []; } catch (e) { return null; } };
  const ns = "http://www.w3.org/2000/svg";
  const poly = (pts, cls) => {
    const p = document.createElementNS(ns, pts.length > 2 || cls !== "zone-open" ? "polygon" : "polyline");
    p.setAttribute("points", pts.map(([x, y]) => x * w + "," + y * h).join(" "));
    p.setAttribute("class", cls);
    return p;
  };
  const draw = () => {
    svg.replaceChildren();
    for (const z of zones() || []) if (z && Array.isArray(z.points)) svg.appendChild(poly(z.points, "zone-" + z.kind));
    if (open.length) svg.appendChild(poly(open, "zone-open"));
    document.getElementById("corners").textContent = open.length;
  };
  svg.addEventListener("click", (ev) => {
    const r = svg.getBoundingClientRect();
    const x = Math.min(Math.max((ev.clientX - r.left) / r.width, 0), 1);
    const y = Math.min(Math.max((ev.clientY - r.top) / r.height, 0), 1);
    open.push([Number(x.toFixed(4)), Number(y.toFixed(4))]);
    draw();
  });
  const close = (kind) => {
    const z = zones();
    if (z === null || open.length < 3) return;
    z.push({ kind, points: open });
    open = [];
    box.value = JSON.stringify(z);
    draw();
  };
  document.getElementById("close-ignore").addEventListener("click", () => close("ignore"));
  document.getElementById("close-inspect").addEventListener("click", () => close("inspect"));
  document.getElementById("undo").addEventListener("click", () => { open.pop(); draw(); });
  document.getElementById("clear").addEventListener("click", () => { open = []; box.value = "[]"; draw(); });
  box.addEventListener("input", draw);
  draw();
}

document.addEventListener("DOMContentLoaded", () => {
  const tiles = document.getElementById("tiles");
  if (tiles && tiles.dataset.live) liveTiles(tiles);
  toggles();
  ask();
  drawZones();
});
