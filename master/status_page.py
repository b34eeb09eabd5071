"""The status page at ``/``: one self-contained HTML document (no build step, nothing
fetched from elsewhere) that polls /v1/cluster, /v1/nodes and /v1/stats every two
seconds and follows /v1/events. With credentials configured it asks once for the viewer
credential and keeps it in the ``kvpool_token`` cookie, which the viewer endpoints accept."""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kvpool status</title>
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:24px;align-items:baseline}
 header h1{font-size:18px;margin:0} .pill{padding:1px 8px;border-radius:9px;background:#3a4256}
 .ok{background:#1f7a45}.bad{background:#a33}
 main{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px;padding:14px}
 section{background:#fff;border-radius:6px;padding:12px 14px;box-shadow:0 1px 2px #0002}
 h2{font-size:14px;margin:0 0 8px;text-transform:uppercase;letter-spacing:.05em;color:#56607a}
 .big{font-size:26px;font-weight:600} .kpis{display:flex;gap:26px;flex-wrap:wrap}
 .kpis div span{display:block;color:#56607a;font-size:12px}
 table{border-collapse:collapse;width:100%} td,th{padding:3px 6px;text-align:left;font-size:13px}
 th{color:#56607a;font-weight:500;border-bottom:1px solid #ddd}
 .bar{background:#e4e7ee;border-radius:3px;height:12px;width:160px;position:relative}
 .bar i{position:absolute;left:0;top:0;bottom:0;background:#3d7be0;border-radius:3px}
 .bar b{position:absolute;top:0;bottom:0;width:2px;background:#c33}
 #events td{font-family:ui-monospace,monospace;font-size:12px;white-space:nowrap}
 .BlockStored{color:#1f7a45}.BlockRemoved{color:#a33}.AllBlocksCleared,.EventsLost{color:#b60;font-weight:600}
 svg{width:100%;height:120px;background:#fafbfc} #login{display:none;padding:14px}
 #err{color:#a33;padding:0 18px}
</style></head>
<body>
<header><h1>kvpool</h1><span id="cluster">…</span><span id="role" class="pill">…</span>
 <span id="updated" style="margin-left:auto;color:#aab"></span></header>
<form id="login"><b>This pool requires a credential.</b> Viewer (or admin) token:
 <input id="token" type="password" size="40" autocomplete="off"> <button>Show</button></form>
<div id="err"></div>
<main>
 <section><h2>Pool</h2><div class="kpis">
  <div><span>nodes</span><b class="big" id="nodes-count" data-testid="nodes-count">–</b></div>
  <div><span>blocks</span><b class="big" id="blocks-count" data-testid="blocks-count">–</b></div>
  <div><span>puts in flight</span><b class="big" id="pending-count">–</b></div>
  <div><span>prefix hit rate</span><b class="big" id="hit-rate">–</b></div></div>
  <div class="kpis" style="margin-top:10px">
  <div><span>puts/s (blocks)</span><b id="puts-rate">–</b></div>
  <div><span>gets/s (blocks)</span><b id="gets-rate">–</b></div>
  <div><span>matches/s (blocks)</span><b id="match-rate">–</b></div>
  <div><span>evictions/s</span><b id="evict-rate">–</b></div></div></section>
 <section><h2>Prefix hit rate and ops/s over time</h2><svg id="chart" viewBox="0 0 600 120"
  preserveAspectRatio="none"></svg><div style="font-size:12px;color:#56607a">
  <span style="color:#3d7be0">■</span> hit rate (0–100%) &nbsp; <span style="color:#1f7a45">■</span>
  ops/s (scaled to the window's peak)</div></section>
 <section style="grid-column:1/-1"><h2>Nodes and tiers</h2><table id="nodes"><thead><tr>
  <th>node</th><th>tier</th><th>use</th><th></th><th>used</th><th>capacity</th><th>blocks</th>
  </tr></thead><tbody></tbody></table></section>
 <section style="grid-column:1/-1"><h2>Latest events</h2><table id="events"><thead><tr>
  <th>id</th><th>time</th><th>type</th><th>medium</th><th>node</th><th>reason</th><th>blocks</th>
  </tr></thead><tbody></tbody></table></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const KEEP_EVENTS = 40, KEEP_POINTS = 90;
let prev = null, points = [], source = null, lastId = null;

function human(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + u[i];
}
function cell(row, text, cls) {
  const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; row.appendChild(td); return td;
}
async function api(path) {
  const r = await fetch(path, {credentials: "same-origin", cache: "no-store"});
  if (r.status === 401 || r.status === 403) { askToken(); throw new Error("needs a credential"); }
  if (!r.ok) throw new Error(path + " answered " + r.status);
  return r.json();
}
function askToken() { $("login").style.display = "block"; }
$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  document.cookie = "kvpool_token=" + encodeURIComponent($("token").value) +
                    "; path=/; SameSite=Strict";
  $("login").style.display = "none"; refresh(); follow();
});

function renderNodes(nodes) {
  const body = $("nodes").tBodies[0]; body.replaceChildren();
  for (const n of nodes) {
    n.tiers.forEach((t, i) => {
      const row = body.insertRow(); row.dataset.node = n.node_id; row.dataset.tier = t.kind;
      row.dataset.state = n.state || "active";
      const who = cell(row, i ? "" : n.node_id);
      if (!i && n.state && n.state !== "active") {  // draining, drained (can be stopped), stuck
        const tag = document.createElement("small"); tag.dataset.testid = "node-state";
        tag.textContent = " " + n.state + (n.can_stop ? ": can be stopped" : ` (${n.left} left)`);
        tag.title = n.note || ""; who.appendChild(tag);
      }
      cell(row, t.kind);
      const pct = t.capacity ? 100 * t.used / t.capacity : 0;
      const bar = cell(row, ""); const div = document.createElement("div"); div.className = "bar";
      const fill = document.createElement("i"); fill.style.width = pct.toFixed(1) + "%";
      const mark = document.createElement("b"); mark.style.left = (100 * t.high_watermark) + "%";
      mark.title = "high watermark"; div.append(fill, mark); bar.appendChild(div);
      cell(row, pct.toFixed(1) + "%"); cell(row, human(t.used)); cell(row, human(t.capacity));
      cell(row, String(t.blocks)).dataset.testid = "tier-blocks";
    });
  }
}

function renderChart() {
  const svg = $("chart"); if (points.length < 2) return;
  const peak = Math.max(1, ...points.map(p => p.ops));
  const x = (i) => (600 * i / (KEEP_POINTS - 1)).toFixed(1);
  const line = (f) => points.map((p, i) => x(i) + "," + (118 - 116 * f(p)).toFixed(1)).join(" ");
  svg.innerHTML = '<polyline fill="none" stroke="#3d7be0" stroke-width="2" points="' +
    line(p => p.hit) + '"/><polyline fill="none" stroke="#1f7a45" stroke-width="1.5" points="' +
    line(p => p.ops / peak) + '"/>';
}

function renderStats(s) {
  const c = s.counters, now = s.ts;
  const looked = c.match_hits + c.match_misses;
  if (prev) {
    const dt = Math.max(0.001, now - prev.ts), p = prev.counters;
    const rate = (k) => (c[k] - p[k]) / dt;
    const puts = rate("committed"), gets = rate("get_hits") + rate("get_misses");
    const matches = rate("match_hits") + rate("match_misses");
    $("puts-rate").textContent = puts.toFixed(1); $("gets-rate").textContent = gets.toFixed(1);
    $("match-rate").textContent = matches.toFixed(1);
    $("evict-rate").textContent = rate("evicted").toFixed(1);
    const dl = (c.match_hits - p.match_hits) + (c.match_misses - p.match_misses);
    const hit = dl ? (c.match_hits - p.match_hits) / dl : (points.length ? points.at(-1).hit : 0);
    points.push({hit, ops: puts + gets + matches});
    if (points.length > KEEP_POINTS) points.shift();
    renderChart();
  }
  $("hit-rate").textContent = looked ? (100 * c.match_hits / looked).toFixed(1) + "%" : "–";
  prev = s;
  if (lastId === null) {  // the first look: show the latest events, then follow from there
    for (const e of s.events.recent) addEvent(e);
    lastId = s.events.last_id; follow();
  }
}

function addEvent(e) {
  const body = $("events").tBodies[0];
  const row = body.insertRow(0); row.className = e.type;
  cell(row, String(e.id)); cell(row, new Date(e.ts * 1000).toLocaleTimeString());
  cell(row, e.type); cell(row, e.medium || ""); cell(row, e.node || "");
  cell(row, e.reason || (e.missed !== undefined ? "missed " + (e.missed ?? "?") : ""));
  const keys = e.block_hashes || [];
  // a put's chain is one event: its first blocks, its last, and how many
  const shown = keys.length > 3 ? [...keys.slice(0, 2), "…", keys[keys.length - 1]] : keys;
  cell(row, shown.map(k => k.slice(0, 12)).join(" ") +
    (keys.length > 3 ? " (" + keys.length + " blocks)" : ""));
  while (body.rows.length > KEEP_EVENTS) body.deleteRow(-1);
}

function follow() {
  if (source || lastId === null) return;
  source = new EventSource("/v1/events?last_event_id=" + lastId);
  for (const t of ["BlockStored", "BlockRemoved", "AllBlocksCleared", "EventsLost"])
    source.addEventListener(t, (m) => addEvent(JSON.parse(m.data)));
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) { source = null; } };
}

async function refresh() {
  try {
    const [cluster, nodes, stats] = await Promise.all(
      [api("/v1/cluster"), api("/v1/nodes"), api("/v1/stats?recent=" + KEEP_EVENTS)]);
    $("cluster").textContent = "cluster " + cluster.cluster;
    $("role").textContent = stats.role; $("role").className = "pill " + (cluster.ready ? "ok" : "bad");
    $("nodes-count").textContent = cluster.nodes; $("blocks-count").textContent = cluster.blocks;
    $("pending-count").textContent = cluster.pending;
    renderNodes(nodes.nodes); renderStats(stats);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    $("err").textContent = ""; document.body.dataset.loaded = "1";
  } catch (err) { $("err").textContent = String(err.message || err); }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
