// The BACKBEAT dashboard: applies the server's snapshot and deltas (GET events, server-sent
// events) to the page. EventSource reconnects by itself; each (re)connection starts with a
// snapshot, and a delta not newer than what is shown is ignored.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const view = { seq: 0, history: 8, agents: new Map(), reports: [], handovers: [] };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function pct(x) {
  return `${Math.round(x * 100)}%`;
}

// --- beat and tempo ------------------------------------------------------------------------------
function showBeat(beat) {
  if (!beat) return;
  $("beat-index").textContent = beat.beat_index;
  $("bar-number").textContent = `${beat.bar} (beat ${beat.position + 1}/${beat.beats_per_bar})`;
  $("phase").textContent = beat.phase;
  $("tempo-announced").textContent = beat.tempo_bpm;
  $("tempo-measured").textContent = beat.measured_bpm ? beat.measured_bpm.toFixed(1) : "–";
  $("tempo-drift").textContent = beat.measured_bpm ? beat.drift_ms.toFixed(1) : "–";
  $("pulse-node").textContent = beat.pulse_node || "–";
  const cells = $("beat-cells");
  if (cells.children.length !== beat.beats_per_bar) {
    cells.replaceChildren();
    for (let i = 0; i < beat.beats_per_bar; i++) cells.append(el("li", {}, String(i + 1)));
  }
  [...cells.children].forEach((cell, i) => {
    const on = i === beat.position;
    cell.classList.toggle("on", on);
    if (on) cell.setAttribute("aria-current", "step");
    else cell.removeAttribute("aria-current");
  });
}

// --- agents --------------------------------------------------------------------------------------
function agentRow(a) {
  const bar = el("progress", { max: "1", value: String(a.progress) });
  bar.textContent = pct(a.progress);
  return el(
    "tr",
    { "data-agent": a.agent_id },
    el("th", { scope: "row" }, a.agent_id),
    el("td", { class: `state state-${a.state}` }, a.state),
    el("td", { class: "progress" }, bar, " ", pct(a.progress)),
    el("td", { class: "num" }, String(a.beats_left)),
    el("td", {}, a.task_id),
    el("td", {}, a.wait_for.join(", ")),
    el("td", {}, a.signed ? `signed (${a.key}…)` : "unsigned"),
    el("td", { class: "num" }, String(a.claims)),
    el("td", { class: "notes" }, a.notes),
  );
}

function showAgents() {
  const body = $("agents").tBodies[0];
  const rows = [...view.agents.values()].sort((x, y) => x.agent_id.localeCompare(y.agent_id));
  body.replaceChildren(...rows.map(agentRow));
}

// --- bar reports, issues, the deadlock cycle ------------------------------------------------------
function showReports() {
  const list = $("reports");
  list.replaceChildren(
    ...view.reports
      .slice()
      .reverse()
      .map((r) => {
        const kinds = r.issues.map((i) => `${i.kind} (${i.agent_id})`).join(", ") || "no issues";
        return el(
          "li",
          { "data-window": r.window_id },
          `bar ${r.bar} (beats ${r.from_beat}–${r.to_beat}): ${r.agents_reporting} agents, ` +
            `${r.claims} claims, ${r.rejected} rejected, ${r.late} late, ` +
            `mean progress ${pct(r.mean_progress)} — ${kinds}`,
        );
      }),
  );
  const latest = view.reports[view.reports.length - 1];
  if (!latest) return;
  $("reverb-node").textContent = latest.reverb_node || "–";
  $("latest-report").textContent =
    `bar ${latest.bar} (beats ${latest.from_beat}–${latest.to_beat})` +
    (latest.blocked.length ? `; blocked: ${latest.blocked.join(", ")}` : "");
  const body = $("issues").tBodies[0];
  body.replaceChildren(
    ...latest.issues.map((i) =>
      el(
        "tr",
        { class: `issue issue-${i.kind}` },
        el("td", {}, i.kind),
        el("td", {}, i.agent_id),
        el("td", {}, i.detail),
      ),
    ),
  );
  if (!latest.issues.length) body.append(el("tr", {}, el("td", { colspan: "3" }, "none")));
  const deadlock = latest.issues.find((i) => i.cycle);
  drawCycle(deadlock ? deadlock.cycle : null);
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function drawCycle(cycle) {
  const figure = $("deadlock");
  const canvas = $("deadlock-cycle");
  if (!cycle) {
    figure.hidden = true;
    canvas.replaceChildren();
    return;
  }
  const nodes = cycle.slice(0, -1); // the first agent is repeated last
  const c = 120;
  const r = nodes.length > 1 ? 80 : 0;
  const at = (i) => {
    const a = (2 * Math.PI * i) / nodes.length - Math.PI / 2;
    return [c + r * Math.cos(a), c + r * Math.sin(a)];
  };
  const marker = svg("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
    markerWidth: 8, markerHeight: 8, orient: "auto-start-reverse",
  });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow-head" }));
  const defs = svg("defs", {});
  defs.append(marker);
  const parts = [defs];
  const radius = 26;
  nodes.forEach((_, i) => {
    const [x1, y1] = at(i);
    const [x2, y2] = at((i + 1) % nodes.length);
    const len = Math.hypot(x2 - x1, y2 - y1) || 1;
    const [dx, dy] = [(x2 - x1) / len, (y2 - y1) / len];
    // a slight bend so that two agents waiting on each other get two visible arrows
    const [mx, my] = [(x1 + x2) / 2 - dy * 18, (y1 + y2) / 2 + dx * 18];
    parts.push(
      svg("path", {
        d: `M ${x1 + dx * radius} ${y1 + dy * radius} Q ${mx} ${my} ` +
          `${x2 - dx * radius} ${y2 - dy * radius}`,
        class: "edge", "marker-end": "url(#arrow)",
      }),
    );
  });
  nodes.forEach((name, i) => {
    const [x, y] = at(i);
    const g = svg("g", { class: "node" });
    g.append(svg("circle", { cx: x, cy: y, r: radius }));
    const label = svg("text", { x, y, "text-anchor": "middle", "dominant-baseline": "central" });
    label.textContent = name;
    g.append(label);
    parts.push(g);
  });
  canvas.replaceChildren(...parts);
  $("deadlock-caption").textContent = `deadlock: ${cycle.join(" → ")} (each waits for the next)`;
  figure.hidden = false;
}

// --- hand-overs, counters -------------------------------------------------------------------------
function showHandovers() {
  const list = $("handovers");
  if (!view.handovers.length) return;
  list.replaceChildren(
    ...view.handovers
      .slice()
      .reverse()
      .map((h) =>
        el("li", {}, `${h.at}: ${h.role} hand-over at beat ${h.beat_index}: ` +
          `node ${h.from_node} → ${h.to_node}`),
      ),
  );
}

function showCounters(counters, malformed, lastError) {
  if (counters) view.counters = counters;
  if (malformed) view.malformed = malformed;
  if (lastError !== undefined) view.lastError = lastError;
  const c = view.counters || {};
  const m = view.malformed || {};
  const bad = (m.beat || 0) + (m.status || 0) + (m.bar || 0);
  $("counters").textContent =
    `seen: ${c.beats || 0} beats, ${c.claims || 0} claims, ${c.reports || 0} bar reports, ` +
    `${c.handovers || 0} hand-overs; malformed skipped: ${bad}` +
    (view.lastError ? ` (last: ${view.lastError})` : "");
}

// --- the stream ------------------------------------------------------------------------------------
function applySnapshot(s) {
  view.seq = s.seq;
  view.history = s.history;
  view.agents = new Map(s.agents.map((a) => [a.agent_id, a]));
  view.reports = s.reports;
  view.handovers = s.handovers;
  $("cluster-id").textContent = s.cluster_id;
  showBeat(s.beat);
  showAgents();
  showReports();
  showHandovers();
  showCounters(s.counters, s.malformed, s.last_error);
}

const apply = {
  beat: (d) => showBeat(d.beat),
  agent: (d) => {
    view.agents.set(d.agent.agent_id, d.agent);
    showAgents();
  },
  report: (d) => {
    view.reports = view.reports.filter((r) => r.window_id !== d.report.window_id);
    view.reports.push(d.report);
    view.reports = view.reports.slice(-view.history);
    showReports();
  },
  handover: (d) => {
    view.handovers.push(d.handover);
    view.handovers = view.handovers.slice(-view.history);
    showHandovers();
  },
  malformed: (d) => showCounters(null, d.malformed, d.last_error),
};

function connect() {
  const status = $("connection");
  const events = new EventSource("events");
  events.addEventListener("open", () => {
    status.textContent = "live";
    status.className = "status live";
  });
  events.addEventListener("error", () => {
    status.textContent = "disconnected: reconnecting…";
    status.className = "status down";
  });
  events.addEventListener("snapshot", (e) => applySnapshot(JSON.parse(e.data)));
  for (const [kind, handle] of Object.entries(apply)) {
    events.addEventListener(kind, (e) => {
      const delta = JSON.parse(e.data);
      if (delta.seq <= view.seq) return;
      view.seq = delta.seq;
      handle(delta);
      if (delta.counters) showCounters(delta.counters);
    });
  }
}

connect();
