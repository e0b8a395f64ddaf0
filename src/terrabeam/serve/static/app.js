// terrabeam dashboard: the runs page (#/) and a run's page (#/runs/<id>), from the JSON API under
// /api. Everything it loads comes from this server (Leaflet is vendored); an online base layer only
// if `terrabeam serve --basemap URL` asked for one.
"use strict";

const view = document.getElementById("view");
const REFRESH_MS = 2000; // while a run is running
let settings = { basemap: null };
let timer = null;
let map = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

async function api(path) {
  const response = await fetch(path);
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.detail || `${path}: HTTP ${response.status}`);
  }
  return response.json();
}

const seconds = (s) => (s === null || s === undefined ? "–" : s.toFixed(1));
const when = (t) => (t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "–");
const status = (s) => el("span", { class: `status ${s}` }, s);
const windowText = (w) => (w ? `${w[0]} / ${w[1]}` : "–");

function schedule(again, running) {
  clearTimeout(timer);
  if (running) timer = setTimeout(again, REFRESH_MS);
}

async function showRuns() {
  const runs = await api("/api/runs");
  const rows = runs.map((r) =>
    el(
      "tr",
      { "data-run": r.id },
      el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(r.id)}` }, r.id)),
      el("td", {}, r.pipeline),
      el("td", {}, windowText(r.window)),
      el("td", {}, status(r.status)),
      el("td", {}, when(r.created)),
      el("td", { class: "num" }, seconds(r.wall_seconds)),
      el("td", { class: "num" }, seconds(r.step_seconds)),
      el("td", { class: "num" }, r.pixels === null ? "–" : r.pixels.toLocaleString("en")),
      el("td", { class: "num" }, r.mpx_per_second === null ? "–" : r.mpx_per_second.toFixed(3)),
      el("td", { class: "error" }, r.error ? `${r.failed_step ? r.failed_step + ": " : ""}${r.error}` : ""),
    ),
  );
  view.replaceChildren(
    el("h1", {}, `Runs (${runs.length})`),
    runs.length === 0
      ? el("p", { class: "note" }, "No runs yet: start one with terrabeam run CONFIG.")
      : el(
          "table",
          { id: "runs-table" },
          el("tr", {}, ["run", "pipeline", "window", "status", "started (UTC)", "wall s", "step s", "pixels",
            "Mpx/s", "error (failing step)"].map((h) => el("th", {}, h))),
          rows,
        ),
  );
  schedule(() => route(), runs.some((r) => r.status === "running"));
}

function progressBar(progress) {
  if (!progress) return el("p", { class: "note" }, "running (no progress reported yet)");
  const share = progress.total ? progress.done / progress.total : 0;
  const eta = progress.rate > 0 ? (progress.total - progress.done) / progress.rate : null;
  return el(
    "div",
    { id: "progress" },
    el("div", { class: "progress" }, el("div", { style: `width:${(100 * share).toFixed(1)}%` })),
    el("p", {}, `${progress.label}: ${progress.done} / ${progress.total} ${progress.unit}` +
      ` · ${progress.rate.toFixed(2)}/s${eta === null ? "" : ` · ETA ${Math.round(eta)} s`}`),
  );
}

async function showRun(id) {
  const run = await api(`/api/runs/${encodeURIComponent(id)}`);
  const steps = el(
    "table",
    { id: "steps-table" },
    el("tr", {}, ["step", "status", "attempts", "seconds", "error", "details"].map((h) => el("th", {}, h))),
    run.steps.map((s) =>
      el(
        "tr",
        { "data-step": s.name },
        el("td", {}, s.name),
        el("td", {}, status(s.status)),
        el("td", { class: "num" }, s.attempts),
        el("td", { class: "num" }, seconds(s.seconds)),
        el("td", { class: "error" }, s.error || ""),
        el("td", {}, Object.entries(s.details).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ")),
      ),
    ),
  );
  const outputs = el(
    "ul",
    { id: "outputs" },
    run.outputs.map((o) => el("li", {}, el("code", {}, o.location), o.exists ? "" : " (no longer there)")),
  );
  const facts = [
    ["pipeline", run.pipeline], ["window", windowText(run.window)], ["started", when(run.created)],
    ["finished", when(run.finished)], ["wall seconds", seconds(run.wall_seconds)],
    ["pixels", run.pixels === null ? "–" : run.pixels.toLocaleString("en")],
    ["Mpx/s", run.mpx_per_second === null ? "–" : run.mpx_per_second.toFixed(3)],
    ["config", run.config_path || "–"],
  ];
  const keepMap = map && map._terrabeamRun === run.id && document.getElementById("map");
  const mapSection = keepMap ? document.getElementById("map-section") : mapPanel(run);
  view.replaceChildren(...[
    el("p", {}, el("a", { href: "#/" }, "← all runs")),
    el("h1", {}, `Run ${run.id} `, status(run.status)),
    run.status === "running" ? progressBar(run.progress) : null,
    run.error ? el("p", { class: "error", id: "run-error" },
      `${run.failed_step ? `step ${run.failed_step} failed: ` : ""}${run.error}`) : null,
    el("table", { id: "facts" }, facts.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))),
    el("h2", {}, "Steps"),
    steps,
    el("h2", {}, "Map"),
    mapSection,
    el("h2", {}, "Outputs"),
    run.outputs.length ? outputs : el("p", { class: "note" }, "none recorded yet"),
  ].filter(Boolean));
  if (!keepMap && run.map) startMap(run);
  schedule(() => route(), run.status === "running");
}

function mapPanel(run) {
  if (!run.map) {
    return el("div", { id: "map-section" }, el("p", { class: "note", id: "no-map" },
      run.status === "running" ? "the map appears once the run has delivered it" : "this run delivered no class map"));
  }
  const m = run.map;
  const options = [el("option", { value: "classes" }, "classes")];
  (m.probabilities || []).forEach((name, i) =>
    options.push(el("option", { value: `prob:${i + 1}` }, `probability: ${name}`)));
  if (m.quicklook_bounds) options.push(el("option", { value: "quicklook" }, "quicklook (image)"));
  return el(
    "div",
    { id: "map-section", class: "maprow" },
    el("div", { id: "map" }),
    el(
      "div",
      { class: "panel" },
      el("label", { for: "layer-select" }, "Layer"),
      el("select", { id: "layer-select" }, options),
      el("label", { for: "opacity" }, "Opacity"),
      el("input", { id: "opacity", type: "range", min: "0", max: "1", step: "0.05", value: "0.8" }),
      el("label", {}, "Legend"),
      el("div", { id: "legend" }),
      el("p", { class: "note" }, `${m.name} · zoom ${m.minzoom}–${m.maxzoom} native`),
    ),
  );
}

function niceStep(span) {
  const steps = [20, 10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001];
  return steps.find((s) => span / s >= 4) || steps[steps.length - 1];
}

function graticule(target) {
  // lines of longitude and latitude over the view: a base that needs no network
  const group = L.layerGroup();
  const draw = () => {
    group.clearLayers();
    const b = target.getBounds();
    const step = niceStep(Math.min(b.getEast() - b.getWest(), b.getNorth() - b.getSouth()));
    const digits = Math.max(0, -Math.floor(Math.log10(step)));
    const style = { color: "#7a8699", weight: 1, opacity: 0.6, interactive: false };
    for (let lon = Math.floor(b.getWest() / step) * step; lon <= b.getEast(); lon += step) {
      group.addLayer(L.polyline([[b.getSouth(), lon], [b.getNorth(), lon]], style));
      group.addLayer(L.marker([b.getSouth(), lon], { interactive: false, icon: L.divIcon({
        className: "graticule-label", html: `${lon.toFixed(digits)}°`, iconAnchor: [-2, 14] }) }));
    }
    for (let lat = Math.floor(b.getSouth() / step) * step; lat <= b.getNorth(); lat += step) {
      group.addLayer(L.polyline([[lat, b.getWest()], [lat, b.getEast()]], style));
      group.addLayer(L.marker([lat, b.getWest()], { interactive: false, icon: L.divIcon({
        className: "graticule-label", html: `${lat.toFixed(digits)}°`, iconAnchor: [-2, 12] }) }));
    }
  };
  group.on("add", () => { draw(); target.on("moveend", draw); });
  group.on("remove", () => target.off("moveend", draw));
  return group;
}

function legendFor(m, choice) {
  const legend = document.getElementById("legend");
  if (choice.startsWith("prob:")) {
    const name = m.probabilities[Number(choice.slice(5)) - 1];
    legend.replaceChildren(
      el("div", {}, `P(${name})`),
      el("div", { class: "ramp", style: `background: linear-gradient(to right, ${m.probability_colors.join(", ")})` }),
      el("div", { class: "ramp-labels" }, el("span", {}, "0"), el("span", {}, "0.5"), el("span", {}, "1")),
    );
    return;
  }
  legend.replaceChildren(...m.classes.map((c) =>
    el("div", { class: "legend-item", "data-class": c.name },
      el("span", { class: "swatch", style: `background:${c.color}` }), `${c.value} ${c.name}`)));
}

function startMap(run) {
  const m = run.map;
  if (map) map.remove();
  const [west, south, east, north] = m.bounds;
  const bounds = L.latLngBounds([south, west], [north, east]);
  map = L.map("map", { maxZoom: m.max_overzoom });
  map._terrabeamRun = run.id;
  map.fitBounds(bounds); // a view first: the graticule draws over the map's bounds
  const bases = { "plain + graticule": graticule(map) };
  if (settings.basemap) {
    bases["online base layer"] = L.tileLayer(settings.basemap, { maxZoom: m.max_overzoom, attribution: "base layer: --basemap" });
  }
  bases["plain + graticule"].addTo(map);
  L.control.layers(bases, {}, { collapsed: false }).addTo(map);
  L.control.scale({ imperial: false }).addTo(map);
  L.rectangle(bounds, { color: "#23395d", weight: 1, fill: false, interactive: false }).addTo(map);

  const tileBase = `/api/runs/${encodeURIComponent(run.id)}/tiles/{z}/{x}/{y}.png`;
  const select = document.getElementById("layer-select");
  const opacity = document.getElementById("opacity");
  let overlay = null;
  let loaded = 0;
  const show = (choice) => {
    if (overlay) map.removeLayer(overlay);
    const alpha = Number(opacity.value);
    if (choice === "quicklook") {
      const [w, s, e, n] = m.quicklook_bounds;
      overlay = L.imageOverlay(`/api/runs/${encodeURIComponent(run.id)}/quicklook`, [[s, w], [n, e]], { opacity: alpha });
    } else {
      const query = choice === "classes" ? "?layer=classes" : `?layer=probabilities&band=${choice.slice(5)}`;
      overlay = L.tileLayer(tileBase + query, {
        bounds, opacity: alpha, minZoom: 0, maxNativeZoom: m.maxzoom, maxZoom: m.max_overzoom,
        className: `tiles-${choice.replace(":", "-")}`,
      });
      let failed = 0;
      overlay.on("tileload", () => { loaded += 1; });
      overlay.on("tileerror", () => {
        // the quicklook stands in when the map's tiles cannot be served
        failed += 1;
        if (failed >= 4 && loaded === 0 && m.quicklook_bounds && select.value !== "quicklook") {
          select.value = "quicklook";
          show("quicklook");
        }
      });
    }
    overlay.addTo(map);
    legendFor(m, choice === "quicklook" ? "classes" : choice);
  };
  select.addEventListener("change", () => show(select.value));
  opacity.addEventListener("input", () => overlay && overlay.setOpacity(Number(opacity.value)));
  show(select.value);
}

async function route() {
  const match = location.hash.match(/^#\/runs\/(.+)$/);
  try {
    if (match) await showRun(decodeURIComponent(match[1]));
    else {
      if (map) { map.remove(); map = null; }
      await showRuns();
    }
  } catch (error) {
    view.replaceChildren(el("p", { class: "error", id: "load-error" }, error.message), el("a", { href: "#/" }, "all runs"));
  }
}

window.addEventListener("hashchange", () => {
  if (map && !location.hash.startsWith(`#/runs/${encodeURIComponent(map._terrabeamRun)}`)) { map.remove(); map = null; }
  route();
});

api("/api/workspace").then((w) => {
  settings = w;
  document.getElementById("workspace").textContent = w.root;
  route();
});
