// nimbus dashboard: plain browser JavaScript, no build step, no libraries.
// Charts and sparklines are SVG drawn here. Data: /ui/api/* (the metrics
// history) and the control API's /v1 routes, with the session cookie and
// the CSRF header.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
let timer = null;
let logAbort = null;

// -- helpers ---------------------------------------------------------------
const API_TIMEOUT_MS = 10000;   // a refresh never waits forever on one answer

async function api(path, options = {}) {
  const headers = Object.assign({"x-nimbus-csrf": "1"}, options.headers || {});
  const r = await fetch(path, Object.assign({}, options, {headers, credentials: "same-origin",
                                                          signal: AbortSignal.timeout(API_TIMEOUT_MS)}));
  if (r.status === 401) { location.href = "/ui/login"; throw new Error("signed out"); }
  if (!r.ok) {
    let msg = r.status + "";
    try { const e = await r.json(); msg = e.errorMessage || msg; } catch (_) { /* text */ }
    throw new Error(msg);
  }
  return r.status === 204 ? null : r.json();
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function num(x, digits = 2) {
  if (x === null || x === undefined) return "–";
  if (Math.abs(x) >= 1000) return Math.round(x).toLocaleString("en");
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}

function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const v = seconds * 1000;
  return v < 10 ? v.toFixed(2) + " ms" : v < 1000 ? v.toFixed(0) + " ms"
    : (v / 1000).toFixed(2) + " s";
}

function ago(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  return s < 60 ? Math.round(s) + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago"
    : Math.round(s / 3600) + " h ago";
}

function clock(ts) {
  return new Date(ts * 1000).toISOString().slice(11, 19);
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  return s < 120 ? Math.round(s) + " s" : s < 7200 ? Math.round(s / 60) + " min"
    : (s / 3600).toFixed(1) + " h";
}

// -- SVG: sparkline and chart ----------------------------------------------
function sparkline(values, color = COLORS[0], w = 120, h = 28) {
  const s = svg("svg", {width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "spark"});
  const known = values.filter((v) => v !== null);
  const max = Math.max(1e-9, ...known);
  const step = values.length > 1 ? w / (values.length - 1) : w;
  let d = "";
  values.forEach((v, i) => {
    if (v === null) return;
    const x = (i * step).toFixed(1), y = (h - 2 - (v / max) * (h - 4)).toFixed(1);
    d += (d && values[i - 1] !== null ? "L" : "M") + x + " " + y;
  });
  if (d) s.append(svg("path", {d, fill: "none", stroke: color, "stroke-width": 1.5}));
  const title = svg("title");
  title.textContent = known.length
    ? `max ${num(max)}, now ${num(known[known.length - 1])}` : "no data yet";
  s.append(title);
  return s;
}

// series: [{name, values, color}], times: seconds; fmt: axis label formatter
function chart(title, times, series, fmt = num, w = 560, h = 180) {
  const pad = {l: 56, r: 8, t: 8, b: 20};
  const iw = w - pad.l - pad.r, ih = h - pad.t - pad.b;
  const s = svg("svg", {width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "chart",
                        role: "img", "aria-label": title});
  let max = 0;
  for (const se of series) for (const v of se.values) if (v !== null && v > max) max = v;
  if (max <= 0) max = 1;
  const n = times.length;
  const x = (i) => pad.l + (n > 1 ? (i / (n - 1)) * iw : 0);
  const y = (v) => pad.t + ih - (v / max) * ih;
  for (let k = 0; k <= 4; k++) {          // grid and y labels
    const v = (max * k) / 4, yy = y(v).toFixed(1);
    s.append(svg("line", {x1: pad.l, x2: w - pad.r, y1: yy, y2: yy, class: "grid"}));
    const t = svg("text", {x: pad.l - 4, y: Number(yy) + 4, "text-anchor": "end",
                           class: "axis"});
    t.textContent = fmt(v);
    s.append(t);
  }
  for (const i of [0, Math.floor((n - 1) / 2), n - 1]) {   // x labels
    if (i < 0 || i >= n) continue;
    const t = svg("text", {x: x(i), y: h - 4, "text-anchor": i === 0 ? "start"
                           : i === n - 1 ? "end" : "middle", class: "axis"});
    t.textContent = clock(times[i]);
    s.append(t);
  }
  series.forEach((se, j) => {
    let d = "";
    se.values.forEach((v, i) => {
      if (v === null) return;
      d += (d && se.values[i - 1] !== null ? "L" : "M") + x(i).toFixed(1) + " "
        + y(v).toFixed(1);
    });
    if (d) {
      s.append(svg("path", {d, fill: "none", stroke: se.color || COLORS[j % COLORS.length],
                            "stroke-width": 1.6, "data-series": se.name}));
    }
  });
  const legend = el("div", {class: "legend"}, ...series.map((se, j) => el("span", {},
    el("i", {class: "swatch c" + (j % COLORS.length)}), se.name)));
  return el("figure", {class: "chart-box"}, el("figcaption", {}, title), s, legend);
}

// header cells; the names in `numeric` are right-aligned like their numbers
function headRow(names, numeric = []) {
  return el("tr", {}, ...names.map((t) => el("th", {class: numeric.includes(t) ? "n" : null}, t)));
}

// -- pages -------------------------------------------------------------------
const page = () => document.getElementById("page");

function setNav(id) {
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.id === id);
}

async function overviewPage() {
  setNav("nav-overview");
  const data = await api("/ui/api/overview");
  const fns = await api("/v1/functions");
  const names = new Set(data.functions.map((f) => f.name));
  const rows = data.functions.slice();
  for (const f of fns) {
    if (!names.has(f.name)) rows.push({name: f.name, versions: [String(f.version)],
      invocations: 0, errors: 0, throttles: 0, rate: 0, error_rate: 0, throttles_1m: 0,
      p50: null, p99: null, instances: f.instances, spark: null});
  }
  rows.sort((a, b) => a.name.localeCompare(b.name));
  const head = headRow(["Function", "Version", "Invocations", "Rate /s", "Errors",
    "Errors /s", "p50", "p99", "Instances", "Throttles", "Rate (15 min)", "Errors (15 min)",
    "p99 (15 min)", "Instances (15 min)"], ["Invocations", "Rate /s", "Errors", "Errors /s",
    "p50", "p99", "Instances", "Throttles"]);
  const body = el("tbody");
  for (const f of rows) {
    const sp = f.spark;
    const cell = (k, v, cls) => el("td", {"data-k": k, class: cls}, v);
    const sparkCell = (k, vals, c) => el("td", {"data-k": k, class: "sparkcell"},
      vals ? sparkline(vals, c) : "");
    body.append(el("tr", {id: "fn-" + f.name, class: f.errors > 0 ? "has-errors" : null},
      el("td", {"data-k": "name"}, el("a", {href: "#/fn/" + encodeURIComponent(f.name)},
        f.name)),
      cell("version", f.versions.join(", ") || "–"),
      cell("invocations", num(f.invocations, 0), "n"),
      cell("rate", num(f.rate), "n"),
      cell("errors", num(f.errors, 0), f.errors > 0 ? "n bad" : "n"),
      cell("error_rate", num(f.error_rate), "n"),
      cell("p50", ms(f.p50), "n"),
      cell("p99", ms(f.p99), "n"),
      cell("instances", num(f.instances, 0), "n"),
      cell("throttles", num(f.throttles, 0), f.throttles > 0 ? "n bad" : "n"),
      sparkCell("spark-rate", sp && sp.rate, COLORS[0]),
      sparkCell("spark-errors", sp && sp.errors, COLORS[1]),
      sparkCell("spark-p99", sp && sp.p99, COLORS[3]),
      sparkCell("spark-instances", sp && sp.instances, COLORS[2])));
  }
  const sampled = data.sampled_at ? "sampled " + clock(data.sampled_at) + " UTC" : "no sample yet";
  page().replaceChildren(
    el("h1", {}, "Functions", el("small", {}, data.region ? " region " + data.region : "")),
    el("p", {class: "muted"}, "Rate, errors and throttles: the last minute; p50/p99: the last "
      + "5 minutes; sparklines: 15 minutes in 10 s steps; " + sampled + "."),
    rows.length ? el("table", {class: "grid-table", id: "functions"}, el("thead", {}, head), body)
      : el("p", {}, "No function deployed yet: nimbus deploy APP_DIR."));
}

function recordRow(r, dead) {
  const err = r.error ? (r.error.errorType || "") + ": " + (r.error.errorMessage || "") : "";
  const cells = [
    el("td", {class: "mono"}, r.id),
    el("td", {"data-k": "status"}, el("span", {class: "badge " + r.status}, r.status)),
    el("td", {class: "n"}, r.attempts), el("td", {}, r.source || r.trigger),
    el("td", {}, ago(r.enqueued_at)), el("td", {class: "err"}, err)];
  if (dead) {
    cells.push(el("td", {}, el("button", {class: "redrive", "data-id": r.id,
      onclick: (ev) => redrive(ev.target, [r.id])}, "Redrive")));
  }
  return el("tr", {"data-id": r.id}, ...cells);
}

async function redrive(button, ids) {
  const name = decodeURIComponent(location.hash.split("/")[2] || "");
  button.disabled = true;
  try {
    const r = await api("/v1/functions/" + encodeURIComponent(name) + "/dlq/redrive",
      {method: "POST", headers: {"content-type": "application/json"},
       body: JSON.stringify(ids ? {ids} : {})});
    flash(`redriven: ${r.redriven}`);
  } catch (e) {
    flash("redrive failed: " + e.message, true);
  }
  refresh();
}

function flash(text, bad = false) {
  const f = document.getElementById("flash");
  if (f) { f.textContent = text; f.className = bad ? "flash bad" : "flash"; }
}

function startLogs(name, box) {
  if (logAbort) logAbort.abort();
  const ctl = logAbort = new AbortController();
  const add = (rec) => {
    const line = el("div", {class: "log " + (rec.stream || "") + (rec.level ? " " + rec.level : "")},
      el("span", {class: "ts"}, clock(rec.ts || 0)),
      el("span", {class: "rid"}, rec.rid ? rec.rid.slice(0, 8) : ""),
      el("span", {class: "stream"}, rec.level || rec.stream || ""),
      el("span", {class: "text"}, rec.text || rec.message || JSON.stringify(rec)));
    const stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    box.append(line);
    while (box.childElementCount > 500) box.firstElementChild.remove();
    if (stick) box.scrollTop = box.scrollHeight;
  };
  (async () => {
    const r = await fetch("/v1/functions/" + encodeURIComponent(name) + "/logs?tail=200&follow=true",
      {headers: {"x-nimbus-csrf": "1"}, credentials: "same-origin", signal: ctl.signal});
    if (!r.ok || !r.body) { box.append(el("div", {class: "log bad"}, "logs: " + r.status)); return; }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const text = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (text.trim()) { try { add(JSON.parse(text)); } catch (_) { /* partial */ } }
      }
    }
  })().catch((e) => { if (e.name !== "AbortError") box.append(el("div", {class: "log bad"}, String(e))); });
}

function pct(x) {
  return x === null || x === undefined ? "–" : (x * 100).toFixed(1) + "%";
}

// a decision's canary or baseline figures, in one line
function figures(f) {
  if (!f) return "–";
  return `${num(f.requests, 0)} req · ${pct(f.error_rate)} errors · p99 ${ms(f.p99)}`
    + (f.throttle_rate ? ` · ${pct(f.throttle_rate)} throttled` : "");
}

const ROLLOUT_STATES = {running: "running", promoted: "promoted", rolled_back: "rolled back"};

// the function's latest rollout: where it is, its steps, and every decision
function rolloutPanel(r) {
  if (!r) return [];
  const running = r.state === "running";
  const head = el("h2", {}, "Rollout ",
    el("span", {class: "badge " + r.state, "data-k": "rollout-state"},
      ROLLOUT_STATES[r.state] || r.state),
    el("small", {class: "muted"}, ` version ${r.from} → ${r.to} · ${r.strategy}`));
  const steps = el("ol", {class: "steps", id: "rollout-steps"}, ...r.steps.map((st, i) => {
    const cls = r.state === "promoted" || i < r.step ? "done"
      : i === r.step && running ? "current" : r.state === "rolled_back" && i === r.step
        ? "failed" : "";
    return el("li", {class: cls}, `${st.share}%`
      + (st.wait_s ? ` for ${duration(st.wait_s)}` : ""));
  }));
  const now = running
    ? `${r.share}% on version ${r.to}, step ${r.step + 1} of ${r.steps.length}`
      + (r.time_left_s !== undefined ? `, ${duration(r.time_left_s)} left in the step` : "")
    : r.state === "promoted" ? `version ${r.to} serves all traffic`
      : `version ${r.from} serves all traffic again`;
  const pairs = [["now", now], ["rolls back on", r.rollback_on],
    ["requests a step needs", num(r.min_requests, 0)], ["started", ago(r.started)]];
  if (r.ended) pairs.push(["ended", ago(r.ended)]);
  if (running && r.waiting) pairs.push(["waiting for", r.waiting]);
  const kv = el("dl", {class: "kv"}, ...pairs.flatMap(([k, v]) =>
    [el("dt", {}, k), el("dd", {}, v)]));
  const parts = [head];
  if (r.state === "rolled_back") {
    parts.push(el("p", {class: "rollout-reason bad", id: "rollout-reason"},
      "Rolled back: " + (r.reason || "no reason recorded")));
  }
  parts.push(steps, kv);
  const rows = r.history.slice().reverse();
  if (rows.length) {
    parts.push(el("table", {class: "grid-table", id: "rollout-history"},
      el("thead", {}, headRow(["When", "Step", "Share", "Decision", "Reason", "New version",
        "Old version"], ["Share"])),
      el("tbody", {}, ...rows.map((d) => el("tr", {"data-action": d.action},
        el("td", {}, clock(d.at)), el("td", {}, d.step + 1),
        el("td", {class: "n"}, d.share + "%"),
        el("td", {}, el("span", {class: "badge " + d.action}, d.action)),
        el("td", {}, d.reason || ""), el("td", {class: "mono"}, figures(d.canary)),
        el("td", {class: "mono"}, figures(d.baseline)))))));
  }
  return parts;
}

function shares(v) {
  const s = Object.entries(v.shares || {}).map(([alias, w]) => `${alias} ${w}%`);
  return s.length ? s.join(" · ") : "–";
}

let fnShell = null;   // the function page's parts, kept across refreshes

async function functionPage(name) {
  setNav("");
  if (!fnShell || fnShell.name !== name) {
    const logs = el("div", {class: "logs", id: "logs"});
    fnShell = {
      name,
      rollout: el("section", {id: "rollout"}),
      stats: el("div", {class: "tiles", id: "tiles"}),
      charts: el("div", {class: "charts", id: "charts"}),
      versions: el("div", {id: "versions"}),
      records: el("div", {id: "records"}),
      dead: el("div", {id: "dead"}),
      logs,
    };
    page().replaceChildren(
      el("p", {}, el("a", {href: "#/"}, "← Functions")),
      el("h1", {}, name),
      el("div", {id: "flash", class: "flash"}),
      fnShell.rollout, fnShell.stats, fnShell.charts,
      el("h2", {}, "Recent logs ", el("small", {class: "muted"}, "(live)")), logs,
      el("h2", {}, "Versions"), fnShell.versions,
      el("h2", {}, "Async invocations"), fnShell.records,
      el("h2", {}, "Dead letters ", el("button", {id: "redrive-all",
        onclick: (ev) => redrive(ev.target, null)}, "Redrive all")), fnShell.dead);
    startLogs(name, logs);
  }
  const q = encodeURIComponent(name);
  const [d, recs, dead] = await Promise.all([
    api("/ui/api/functions/" + q),
    api("/v1/functions/" + q + "/invocations?limit=20").catch(() => []),
    api("/v1/functions/" + q + "/dlq?limit=50").catch(() => [])]);
  if (!fnShell || fnShell.name !== name) return;
  const t = d.totals, o = t.outcomes || {};
  const errors = (o.error || 0) + (o.timeout || 0) + (o.instance_died || 0);
  const tile = (k, label, v, bad) => el("div", {class: "tile" + (bad ? " bad" : ""), "data-k": k},
    el("b", {}, v), el("span", {}, label));
  fnShell.stats.replaceChildren(
    tile("invocations", "invocations", num(t.invocations, 0)),
    tile("errors", "errors", num(errors, 0), errors > 0),
    tile("timeouts", "timeouts", num(o.timeout || 0, 0), (o.timeout || 0) > 0),
    tile("throttles", "throttles", num(o.throttled || 0, 0), (o.throttled || 0) > 0),
    tile("cold_starts", "cold starts", num(t.cold_starts, 0)),
    tile("instances", "instances (idle/busy/starting)",
      `${num((t.instances.idle || 0) + (t.instances.busy || 0) + (t.instances.starting || 0), 0)}`
      + ` (${t.instances.idle || 0}/${t.instances.busy || 0}/${t.instances.starting || 0})`),
    tile("in_flight", "in flight / held", `${num(t.in_flight, 0)} / ${num(t.held, 0)}`),
    tile("async", "queued / running / dead",
      `${t.async.queued || 0} / ${t.async.running || 0} / ${t.async.dead || 0}`));
  const s = d.series;
  fnShell.charts.replaceChildren(
    chart("Invocations and errors (per second)", d.times,
      [{name: "invocations/s", values: s.invocations}, {name: "errors/s", values: s.errors},
       {name: "throttled/s", values: s.throttled}]),
    chart("Latency", d.times, [{name: "p50", values: s.p50}, {name: "p90", values: s.p90},
      {name: "p99", values: s.p99}], ms),
    chart("Concurrency", d.times, [{name: "in flight", values: s.in_flight},
      {name: "held", values: s.held}]),
    chart("Instances", d.times, [{name: "instances", values: s.instances},
      {name: "desired", values: s.desired}]));
  fnShell.rollout.replaceChildren(...rolloutPanel(d.rollout));
  fnShell.versions.replaceChildren(d.versions.length ? el("table", {class: "grid-table",
    id: "versions-table"},
    el("thead", {}, headRow(["Version", "Traffic", "Deployed", "Handler", "Memory", "Timeout",
      "Code"], ["Memory", "Timeout"])),
    el("tbody", {}, ...d.versions.map((v) => el("tr", {class: v.live ? "live-version" : null,
      "data-version": v.version},
      el("td", {}, v.version + (v.live ? " (live)" : "")),
      el("td", {"data-k": "traffic"}, shares(v)), el("td", {}, ago(v.created)),
      el("td", {class: "mono"}, v.handler), el("td", {class: "n"}, v.memory_mb + " MB"),
      el("td", {class: "n"}, v.timeout_s + " s"), el("td", {class: "mono"}, v.digest)))))
    : el("p", {class: "muted"}, "No version records."));
  const table = (rows, deadRows, id) => rows.length ? el("table", {class: "grid-table", id},
    el("thead", {}, headRow(["Invocation", "Status", "Tries", "Source", "Queued", "Error",
      ...(deadRows ? [""] : [])], ["Tries"])),
    el("tbody", {}, ...rows.map((r) => recordRow(r, deadRows))))
    : el("p", {class: "muted"}, deadRows ? "No dead letters." : "No async invocations.");
  fnShell.records.replaceChildren(table(recs, false, "records-table"));
  fnShell.dead.replaceChildren(table(dead, true, "dead-table"));
  document.getElementById("redrive-all").disabled = dead.length === 0;
}

async function regionsPage() {
  setNav("nav-regions");
  const st = await api("/v1/status");
  const parts = [el("h1", {}, "Regions and nodes")];
  const kv = (pairs) => el("dl", {class: "kv"}, ...pairs.flatMap(([k, v]) =>
    [el("dt", {}, k), el("dd", {}, v)]));
  if (st.mode === "region") {
    const scrapes = await api("/ui/api/scrapes");
    // the dashboard's own scrape of the node's metrics port, as a health signal
    const scrape = (n) => {
      if (n.role === "controller") return el("span", {class: "muted"}, "–");
      const s = scrapes[n.metrics];
      if (!s) return el("span", {class: "muted"}, n.metrics ? "not yet" : "no metrics port");
      return el("span", {class: "badge " + (s.ok ? "up" : "down"), title: s.error || ""},
        s.ok ? "ok " + ago(s.at) : "failed: " + s.error);
    };
    parts.push(kv([["region", st.region], ["leader", st.leader || "none"],
      ["this controller", st.node + (st.leading ? " (leading)" : "")],
      ["uptime", duration(st.uptime_s)]]));
    parts.push(el("h2", {}, "Nodes"), el("table", {class: "grid-table", id: "nodes"},
      el("thead", {}, headRow(["Role", "Node", "Host", "PID", "URL", "Up for", "Registration",
        "Metrics scrape"], ["PID"])),
      el("tbody", {}, ...st.nodes.map((n) => el("tr", {"data-node": n.id, "data-role": n.role},
        el("td", {}, n.role), el("td", {class: "mono"}, n.id), el("td", {}, n.host || "–"),
        el("td", {class: "n"}, n.pid), el("td", {class: "mono"}, n.url || "–"),
        el("td", {}, duration(n.uptime_s)),
        el("td", {}, el("span", {class: "badge up"}, "lease " + (n.lease || "held"))),
        el("td", {"data-k": "scrape"}, scrape(n)))))));
    if (st.nats && st.nats.length) {
      parts.push(el("h2", {}, "NATS servers"), el("table", {class: "grid-table"},
        el("tbody", {}, ...st.nats.map((s) => el("tr", {},
          ...Object.entries(s).slice(0, 6).map(([k, v]) => el("td", {}, k + ": "
            + (typeof v === "object" ? JSON.stringify(v) : v))))))));
    }
  } else {
    parts.push(kv([["region", st.region], ["mode", "one machine (nimbus up)"],
      ["pid", st.pid], ["uptime", duration(st.uptime_s)], ["gateway", st.gateway_url],
      ["control API", st.control_url], ["requests served", num(st.requests, 0)],
      ["containment", typeof st.containment === "object"
        ? (st.containment.level || st.containment.mode || JSON.stringify(st.containment))
        : st.containment]]));
    parts.push(el("h2", {}, "Nodes"), el("table", {class: "grid-table", id: "nodes"},
      el("thead", {}, headRow(["Role", "PID", "Address", "Health"], ["PID"])),
      el("tbody", {},
        el("tr", {}, el("td", {}, "up (gateway, control, worker)"), el("td", {class: "n"}, st.pid),
          el("td", {class: "mono"}, st.gateway_url), el("td", {},
            el("span", {class: "badge up"}, "up"))),
        ...st.zygotes.map((z) => el("tr", {}, el("td", {}, "zygote"),
          el("td", {class: "n"}, z.pid || "–"), el("td", {class: "mono"},
            (z.preload || []).join(", ") || "base"),
          el("td", {}, el("span", {class: "badge " + (z.pid ? "up" : "down")},
            z.pid ? "up" : "down")))))));
  }
  parts.push(el("h2", {}, "Functions"), el("table", {class: "grid-table"},
    el("thead", {}, headRow(["Function", "Version", "Ready", "Desired", "Held",
      "Queued", "Running", "Dead"], ["Version", "Ready", "Desired", "Held", "Queued", "Running",
      "Dead"])),
    el("tbody", {}, ...st.functions.map((f) => el("tr", {},
      el("td", {}, el("a", {href: "#/fn/" + encodeURIComponent(f.name)}, f.name)),
      el("td", {class: "n"}, f.version), el("td", {class: "n"}, f.ready),
      el("td", {class: "n"}, f.desired === null ? "–" : f.desired),
      el("td", {class: "n"}, f.held), el("td", {class: "n"}, f.async ? f.async.ready : "–"),
      el("td", {class: "n"}, f.async ? f.async.running : "–"),
      el("td", {class: "n"}, f.async ? f.async.dead : "–"))))));
  page().replaceChildren(...parts);
}

async function edgePage() {
  setNav("nav-edge");
  const e = await api("/ui/api/edge");
  if (!e.configured) {
    page().replaceChildren(el("h1", {}, "Edge"), el("p", {}, "No cluster file given: start "
      + "with nimbus up --cluster nimbus.cluster.yaml to see each region's gateways as the "
      + "edge sees them."));
    return;
  }
  const rows = [];
  for (const name of e.order) {
    const r = e.regions[name];
    for (const [i, g] of r.gateways.entries()) {
      rows.push(el("tr", {"data-region": name},
        el("td", {}, i === 0 ? name : ""),
        el("td", {}, i === 0 ? el("span", {class: "badge " + (r.up ? "up" : "down")},
          r.up ? "up" : "down") : ""),
        el("td", {class: "mono"}, g.url),
        el("td", {}, el("span", {class: "badge " + (g.up ? "up" : "down")}, g.up ? "up" : "down")),
        el("td", {class: "n"}, g.latency_ms === null ? "–" : g.latency_ms.toFixed(2) + " ms"),
        el("td", {}, duration(g.since_s)), el("td", {class: "err"}, g.last_error || "")));
    }
  }
  page().replaceChildren(el("h1", {}, "Edge: regions"),
    el("p", {class: "muted"}, `Probing every gateway's /_nimbus/health each second (cluster `
      + `file ${e.cluster_file}; failover order ${e.order.join(" → ")}).`),
    el("table", {class: "grid-table", id: "edge-regions"},
      el("thead", {}, headRow(["Region", "Region health", "Gateway", "Gateway health",
        "Probe latency", "Since", "Last error"], ["Probe latency"])),
      el("tbody", {}, ...rows)));
}

// -- routing and refresh -------------------------------------------------------
function current() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  if (parts[0] === "fn" && parts[1]) return () => functionPage(decodeURIComponent(parts[1]));
  if (parts[0] === "regions") return regionsPage;
  if (parts[0] === "edge") return edgePage;
  return overviewPage;
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  const live = document.getElementById("live");
  try {
    await current()();
    live.className = "live ok";
    live.textContent = "live " + new Date().toISOString().slice(11, 19);
  } catch (e) {
    live.className = "live bad";
    live.textContent = "offline: " + e.message;
  } finally {
    busy = false;
  }
}

function navigate() {
  if (!location.hash.startsWith("#/fn/")) {
    if (logAbort) logAbort.abort();
    fnShell = null;
  }
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/ui/logout", {method: "POST", headers: {"x-nimbus-csrf": "1"},
                               credentials: "same-origin"});
    location.href = "/ui/login";
  });
  window.addEventListener("hashchange", navigate);
  navigate();
  timer = setInterval(refresh, POLL_MS);
});
