/* cbm workbench: parcels coloured by light on a Leaflet map (2-D canvas, no WebGL needed),
   filters, a flagged-parcel list with keyboard navigation, and a parcel panel (series, chips,
   reasons, peers). Data comes from `cbm serve` (fetch) or from an exported folder (script tags,
   since a page opened from disk may not fetch). Formats: cbm_plugins/workbench/_data.py. */
(function () {
  "use strict";
  const S = JSON.parse(document.getElementById("cbm-settings").textContent);
  const waiting = {};
  const CBM = (window.CBM = {
    settings: S,
    drawn: { red: 0, yellow: 0, green: 0, "": 0 }, // parcels drawn per light (read by the tests)
    ready: false,
    put(key, value) {
      (waiting[key] || []).forEach((resolve) => resolve(value));
      delete waiting[key];
    },
  });
  const cache = new Map();

  function load(key, kind) {
    if (cache.has(key)) return cache.get(key);
    let promise;
    if (S.mode === "static") {
      promise = new Promise((resolve, reject) => {
        (waiting[key] = waiting[key] || []).push(resolve);
        const script = document.createElement("script");
        script.src = S.base + key + ".js";
        script.onerror = () => {
          delete waiting[key];
          reject(new Error("not in this export: " + key));
        };
        script.onload = () => script.remove();
        document.head.appendChild(script);
      }).then((value) => (kind === "bin" ? bytes(value) : value));
    } else {
      promise = fetch(S.base + key, { credentials: "same-origin" }).then((r) => {
        if (!r.ok) return r.text().then((t) => Promise.reject(new Error(r.status + " " + key + ": " + t.slice(0, 200))));
        return kind === "bin" ? r.arrayBuffer() : r.json();
      });
    }
    promise.catch(() => cache.delete(key));
    cache.set(key, promise);
    return promise;
  }

  function bytes(base64) {
    const text = atob(base64);
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out.buffer;
  }

  const $ = (id) => document.getElementById(id);
  const status = (text, error) => {
    $("status").textContent = text;
    $("status").className = error ? "error" : "";
  };
  const esc = (text) =>
    String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  let meta, index, map, parcels, selected, outline;
  let filtered = []; // rows of the flagged parcels passing the filters, in list order
  let current = -1; // position in `filtered` of the selected parcel

  // Index ---------------------------------------------------------------------------------------
  function decodeIndex(buffer) {
    const n = new DataView(buffer).getUint32(0, true);
    let o = 4;
    const take = (Type, size) => {
      const a = new Type(buffer, o, n);
      o += size * n;
      return a;
    };
    const idx = { n, pid: take(Int32Array, 4), mask: take(Uint32Array, 4), lon: take(Float32Array, 4), lat: take(Float32Array, 4) };
    idx.crop = take(Uint16Array, 2);
    idx.light = take(Uint8Array, 1);
    idx.row = new Map();
    idx.mx = new Float64Array(n); // Web-Mercator pixel at zoom 0 (256 px world)
    idx.my = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      idx.row.set(idx.pid[i], i);
      idx.mx[i] = ((idx.lon[i] + 180) / 360) * 256;
      const s = Math.sin((Math.max(Math.min(idx.lat[i], 85.05), -85.05) * Math.PI) / 180);
      idx.my[i] = (0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI)) * 256;
    }
    return idx;
  }

  // Parcel tiles --------------------------------------------------------------------------------
  function decodeTile(buffer) {
    const view = new DataView(buffer);
    const count = view.getUint32(0, true);
    let o = 4;
    const found = [];
    for (let k = 0; k < count; k++) {
      const row = view.getUint32(o, true);
      const nRings = view.getUint16(o + 4, true);
      o += 6;
      const rings = [];
      for (let r = 0; r < nRings; r++) {
        const points = view.getUint16(o, true);
        o += 2;
        rings.push(new Int16Array(buffer.slice(o, o + 4 * points)));
        o += 4 * points;
      }
      found.push({ row, rings });
    }
    return found;
  }
  const tile = (x, y) => load(`tiles/${meta.tileZoom}/${x}/${y}`, "bin").then(decodeTile, () => []);

  function colour(row) {
    return meta.colours[meta.lights[index.light[row]]] || "#9e9e9e";
  }

  function passes(row) {
    const f = filters();
    if (!f.lights.has(meta.lights[index.light[row]])) return false;
    if (f.marker >= 0 && !(index.mask[row] & (1 << f.marker))) return false;
    if (f.crop >= 0 && index.crop[row] !== f.crop) return false;
    if (f.reason) {
      const reason = meta.reasons[index.pid[row]] || "";
      if (!reason.toLowerCase().includes(f.reason)) return false;
    }
    return true;
  }

  const ParcelLayer = L.GridLayer.extend({
    createTile(coords, done) {
      const canvas = L.DomUtil.create("canvas", "parcel-tile");
      const size = this.getTileSize();
      canvas.width = size.x;
      canvas.height = size.y;
      drawTile(canvas, coords).then(
        () => done(null, canvas),
        (error) => done(error, canvas),
      );
      return canvas;
    },
  });

  async function drawTile(canvas, coords) {
    const ctx = canvas.getContext("2d");
    const z = coords.z;
    const scale = 2 ** z;
    if (z < meta.polygonMinZoom) {
      for (let i = 0; i < index.n; i++) {
        const x = index.mx[i] * scale - coords.x * 256;
        const y = index.my[i] * scale - coords.y * 256;
        if (x < -4 || y < -4 || x > 260 || y > 260) continue;
        const ok = passes(i);
        ctx.globalAlpha = ok ? 1 : 0.25;
        ctx.fillStyle = ok ? colour(i) : "#9e9e9e";
        ctx.beginPath();
        ctx.arc(x, y, z >= 11 ? 3 : 2, 0, 2 * Math.PI);
        ctx.fill();
        CBM.drawn[meta.lights[index.light[i]]] += 1;
      }
      return;
    }
    const tz = meta.tileZoom;
    const keys = [];
    if (z >= tz) keys.push([coords.x >> (z - tz), coords.y >> (z - tz)]);
    else {
      const f = 2 ** (tz - z);
      for (let dx = 0; dx < f; dx++) for (let dy = 0; dy < f; dy++) keys.push([coords.x * f + dx, coords.y * f + dy]);
    }
    const seen = new Set();
    const k = (256 * 2 ** (z - tz)) / meta.tileExtent; // quantisation unit -> view pixels
    for (const [tx, ty] of keys) {
      const items = await tile(tx, ty);
      const ox = tx * 256 * 2 ** (z - tz) - coords.x * 256;
      const oy = ty * 256 * 2 ** (z - tz) - coords.y * 256;
      for (const { row, rings } of items) {
        if (seen.has(row)) continue;
        seen.add(row);
        const ok = passes(row);
        ctx.beginPath();
        for (const ring of rings) {
          for (let p = 0; p < ring.length; p += 2) {
            const x = ox + ring[p] * k;
            const y = oy + ring[p + 1] * k;
            if (p === 0) ctx.moveTo(x, y);
            else ctx.lineTo(x, y);
          }
          ctx.closePath();
        }
        ctx.globalAlpha = ok ? 0.45 : 0.12;
        ctx.fillStyle = ok ? colour(row) : "#9e9e9e";
        ctx.fill("evenodd");
        ctx.globalAlpha = ok ? 1 : 0.3;
        ctx.lineWidth = z >= 16 ? 2 : 1.2;
        ctx.strokeStyle = ok ? colour(row) : "#757575";
        ctx.stroke();
        CBM.drawn[meta.lights[index.light[row]]] += 1;
      }
    }
  }

  // Map picking -------------------------------------------------------------------------------
  function worldPixel(latlng, zoom) {
    const p = map.project(latlng, zoom);
    return [p.x, p.y];
  }

  function inside(rings, x, y) {
    let hit = false;
    for (const ring of rings) {
      for (let i = 0, j = ring.length - 2; i < ring.length; j = i, i += 2) {
        const xi = ring[i], yi = ring[i + 1], xj = ring[j], yj = ring[j + 1];
        if (yi > y !== yj > y && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) hit = !hit;
      }
    }
    return hit;
  }

  async function pick(latlng) {
    const tz = meta.tileZoom;
    const [wx, wy] = worldPixel(latlng, tz);
    if (map.getZoom() >= meta.polygonMinZoom) {
      const tx = Math.floor(wx / 256), ty = Math.floor(wy / 256);
      const qx = ((wx - tx * 256) / 256) * meta.tileExtent, qy = ((wy - ty * 256) / 256) * meta.tileExtent;
      for (const { row, rings } of await tile(tx, ty)) if (inside(rings, qx, qy)) return row;
      return -1;
    }
    const z = map.getZoom();
    const [px, py] = worldPixel(latlng, z);
    let best = -1, bestDistance = 64; // within 8 px
    for (let i = 0; i < index.n; i++) {
      const d = (index.mx[i] * 2 ** z - px) ** 2 + (index.my[i] * 2 ** z - py) ** 2;
      if (d < bestDistance) (best = i), (bestDistance = d);
    }
    return best;
  }

  async function outlineOf(row) {
    const tz = meta.tileZoom;
    const p = map.project([index.lat[row], index.lon[row]], tz);
    const tx = Math.floor(p.x / 256), ty = Math.floor(p.y / 256);
    const item = (await tile(tx, ty)).find((i) => i.row === row);
    if (!item) return null;
    return item.rings.map((ring) => {
      const out = [];
      for (let i = 0; i < ring.length; i += 2)
        out.push(map.unproject([tx * 256 + (ring[i] / meta.tileExtent) * 256, ty * 256 + (ring[i + 1] / meta.tileExtent) * 256], tz));
      return out;
    });
  }

  // Filters and list ----------------------------------------------------------------------------
  function filters() {
    const lights = new Set([...document.querySelectorAll("#f-lights input:checked")].map((i) => i.value));
    const marker = $("f-marker").value, crop = $("f-crop").value;
    return {
      lights,
      marker: marker === "" ? -1 : meta.markers.indexOf(marker),
      crop: crop === "" ? -1 : meta.crops.indexOf(crop),
      reason: $("f-reason").value.trim().toLowerCase(),
    };
  }

  function buildFilters() {
    const names = { red: "red", yellow: "yellow", green: "green", "": "none" };
    for (const light of ["red", "yellow", "green", ""]) {
      const label = document.createElement("label");
      label.innerHTML = `<input type="checkbox" value="${light}" ${light === "green" || light === "" ? "" : "checked"}> <span class="dot" style="background:${meta.colours[light]}"></span>${names[light]}`;
      $("f-lights").appendChild(label);
    }
    for (const m of meta.markers) $("f-marker").insertAdjacentHTML("beforeend", `<option>${esc(m)}</option>`);
    for (const c of meta.crops) $("f-crop").insertAdjacentHTML("beforeend", `<option>${esc(c)}</option>`);
    for (const id of ["f-lights", "f-marker", "f-crop"]) $(id).addEventListener("change", refilter);
    $("f-reason").addEventListener("input", refilter);
  }

  const LIST_MAX = 500; // rows in the list; the count says how many match
  function refilter() {
    const order = { red: 0, yellow: 1, green: 2, "": 3 };
    filtered = [];
    for (let i = 0; i < index.n; i++) if (passes(i)) filtered.push(i);
    filtered.sort((a, b) => order[meta.lights[index.light[a]]] - order[meta.lights[index.light[b]]] || index.pid[a] - index.pid[b]);
    const flaggedTotal = Object.keys(meta.reasons).length;
    $("count").textContent = flaggedTotal === 0
      ? `No red or yellow parcel in this run (${index.n} parcels). ${filtered.length} shown by the filters.`
      : `${filtered.length} of ${index.n} parcels match (${flaggedTotal} flagged).`;
    $("list").innerHTML = filtered
      .slice(0, LIST_MAX)
      .map((row) => {
        const pid = index.pid[row];
        return `<li data-row="${row}" title="${esc(meta.reasons[pid] || "")}"><span class="dot" style="background:${colour(row)}"></span>${pid} · ${esc(meta.crops[index.crop[row]])}</li>`;
      })
      .join("") + (filtered.length > LIST_MAX ? `<li class="more">…and ${filtered.length - LIST_MAX} more: narrow the filters</li>` : "");
    current = selected === undefined ? -1 : filtered.indexOf(selected);
    markCurrent();
    CBM.drawn = { red: 0, yellow: 0, green: 0, "": 0 };
    parcels.redraw();
  }

  function markCurrent() {
    document.querySelectorAll("#list li.current").forEach((li) => li.classList.remove("current"));
    const li = document.querySelector(`#list li[data-row="${selected}"]`);
    if (li) {
      li.classList.add("current");
      li.scrollIntoView({ block: "nearest" });
    }
  }

  // Selection and panel -------------------------------------------------------------------------
  async function select(row, { fly = true } = {}) {
    if (row < 0 || row >= index.n) return;
    selected = row;
    current = filtered.indexOf(row);
    markCurrent();
    const pid = index.pid[row];
    if (location.hash !== `#pid=${pid}`) history.replaceState(null, "", `#pid=${pid}`);
    const started = performance.now();
    $("panel").innerHTML = `<p class="empty">Loading parcel ${pid}…</p>`;
    let details;
    try {
      details = await panelData(row);
    } catch (error) {
      $("panel").innerHTML = `<p class="message error">Parcel ${pid}: ${esc(error.message)}</p>`;
      return;
    }
    if (selected !== row) return;
    $("panel").innerHTML = panelHtml(details, row);
    $("panel").querySelectorAll("a[data-row]").forEach((a) => a.addEventListener("click", () => select(+a.dataset.row)));
    CBM.panelMs = performance.now() - started;
    CBM.panelPid = pid;
    const rings = await outlineOf(row);
    if (outline) outline.remove();
    if (rings) {
      outline = L.polygon(rings, { color: "#ffeb3b", weight: 4, fill: false, interactive: false }).addTo(map);
      if (fly) map.fitBounds(outline.getBounds(), { maxZoom: 17, padding: [60, 60], animate: false });
    } else if (fly) map.setView([index.lat[row], index.lon[row]], 16, { animate: false });
  }

  async function panelData(row) {
    const pid = index.pid[row];
    if (S.mode !== "static") return load(`parcel/${pid}`, "json");
    const p = map.project([index.lat[row], index.lon[row]], meta.detailZoom);
    const tx = Math.floor(p.x / 256), ty = Math.floor(p.y / 256);
    for (const [dx, dy] of [[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]]) {
      try {
        const chunk = await load(`details/${meta.detailZoom}/${tx + dx}/${ty + dy}`, "json");
        if (chunk[pid]) return chunk[pid];
      } catch (error) {
        /* next neighbour: a centre on a tile edge */
      }
    }
    throw new Error("no panel data in this export");
  }

  function panelHtml(d, row) {
    const light = d.light || "";
    const colourOf = meta.colours[light] || "#9e9e9e";
    const markers = d.markers.length
      ? `<table><tr><th>marker</th><th>status</th><th>events</th><th>reason</th></tr>${d.markers
          .map((m) => `<tr><td>${esc(m.marker)}</td><td>${esc(m.status)}</td><td>${m.events.map((e) => esc((e.kind || "event") + " " + e.main)).join("<br>") || "none"}</td><td>${esc(m.reason)}</td></tr>`)
          .join("")}</table>`
      : `<p class="note">No marker result for this parcel.</p>`;
    const notes = d.notes.map((n) => `<p class="note">${esc(n)}</p>`).join("");
    const chips = chipHtml(d.pid);
    return `<h2>Parcel ${d.pid} <span class="light" style="background:${colourOf}">${esc((light || "no verdict").toUpperCase())}</span></h2>
      <p>Declared: <b>${esc(d.crop)}</b> · <a href="#pid=${d.pid}">link to this parcel</a></p>
      <h3>Verdict reasons</h3><ul class="reasons">${d.reasons.map((r) => `<li>${esc(r)}</li>`).join("") || "<li>none</li>"}</ul>
      ${notes}
      <h3>Time series</h3>${seriesSvg(d)}
      <h3>Markers</h3>${markers}
      <h3>Peers</h3>${peersHtml(d, row)}
      <h3>Chips</h3>${chips}`;
  }

  function chipHtml(pid) {
    const src = `${S.base}chips/${pid}.png`;
    if (S.mode === "static" && !meta.chips.includes(pid))
      return `<p class="note">No chip calendar in this export for parcel ${pid} (exported: ${meta.chips.length} parcels, the flagged ones). Open the run through <code>cbm serve</code> or run <code>cbm chips</code>.</p>`;
    return `<div class="chips"><img alt="Chip calendar of parcel ${pid}" src="${src}" onerror="this.replaceWith(Object.assign(document.createElement('p'),{className:'note',textContent:'No chips: the imagery of this parcel cannot be read.'}))"></div>`;
  }

  function peersHtml(d, row) {
    const p = d.peers;
    const nearest = [];
    for (let i = 0; i < index.n; i++)
      if (i !== row && index.crop[i] === index.crop[row]) nearest.push([(index.mx[i] - index.mx[row]) ** 2 + (index.my[i] - index.my[row]) ** 2, i]);
    nearest.sort((a, b) => a[0] - b[0]);
    const links = nearest.slice(0, 6).map(([, i]) => `<a data-row="${i}" style="color:${colour(i)}">${index.pid[i]}</a>`).join("");
    return `<p class="peers">${p.count} parcel(s) declared ${esc(d.crop)}: their valid NDVI (10–90 %, median) is the grey band on the chart. Nearest: ${links || "none"}</p>`;
  }

  // Series chart (SVG) --------------------------------------------------------------------------
  function seriesSvg(d) {
    const panels = [];
    if (d.s2.dates.length) panels.push({ title: "Sentinel-2 NDVI", kind: "s2", lo: -0.1, hi: 1 });
    if (d.bs.dates.length) panels.push({ title: "Sentinel-1 backscatter (dB)", kind: "bs" });
    if (d.c6.dates.length) panels.push({ title: "Sentinel-1 coherence", kind: "c6", lo: 0, hi: 1 });
    const w = d.weather || { dates: [] };
    if (w.dates.length) panels.splice(1, 0, { title: "Weather: daily precipitation (mm), mean temperature (°C)", kind: "weather" });
    if (!panels.length) return `<p class="note">No observations of this parcel to plot.</p>`;
    const all = [...d.s2.dates, ...d.bs.dates, ...d.c6.dates, ...d.peers.dates].map((t) => Date.parse(t));
    if (!all.length) all.push(...w.dates.map((t) => Date.parse(t)));
    const t0 = Math.min(...all) - 2 * 864e5, t1 = Math.max(...all) + 2 * 864e5;
    const W = 450, L0 = 34, R = 8, H = 110, GAP = 26;
    const x = (t) => L0 + ((Date.parse(t) - t0) / (t1 - t0)) * (W - L0 - R);
    let svg = "";
    panels.forEach((panel, k) => {
      const top = k * (H + GAP) + 16;
      let lo = panel.lo, hi = panel.hi;
      if (panel.kind === "bs") {
        const v = [...d.bs.VV, ...d.bs.VH].filter((a) => a !== null);
        lo = Math.floor(Math.min(...v) - 1);
        hi = Math.ceil(Math.max(...v) + 1);
      }
      if (panel.kind === "weather") {
        const v = [...w.prec, ...w.tmean].filter((a) => a !== null);
        lo = Math.min(0, Math.floor(Math.min(...v)));
        hi = Math.ceil(Math.max(...v, 1));
      }
      const y = (v) => top + H - ((v - lo) / (hi - lo)) * H;
      svg += `<text x="${L0}" y="${top - 4}" font-weight="bold">${panel.title}</text><rect x="${L0}" y="${top}" width="${W - L0 - R}" height="${H}" fill="none" stroke="#cfd8dc"/>`;
      for (const v of [lo, (lo + hi) / 2, hi]) svg += `<text x="${L0 - 3}" y="${y(v) + 3}" text-anchor="end">${+v.toFixed(1)}</text>`;
      for (const m of d.markers)
        for (const e of m.events) {
          if (e.start && e.end && e.end > e.start) svg += `<rect x="${x(e.start)}" y="${top}" width="${Math.max(1, x(e.end) - x(e.start))}" height="${H}" fill="#6a1b9a" opacity="0.1"/>`;
          svg += `<line class="event" x1="${x(e.main)}" x2="${x(e.main)}" y1="${top}" y2="${top + H}" stroke="#d50000" stroke-dasharray="4 3"><title>${esc(m.marker)}: ${esc(e.kind || "event")} ${esc(e.main)}</title></line>`;
          const right = x(e.main) > W * 0.7; // label left of the line near the right edge
          if (k === 0) svg += `<text x="${x(e.main) + (right ? -3 : 3)}" y="${top + 10}" text-anchor="${right ? "end" : "start"}" fill="#d50000">${esc(e.kind || m.marker)} ${esc(e.main.slice(5))}</text>`;
        }
      if (panel.kind === "s2") {
        const p = d.peers;
        if (p.dates.length) {
          const upper = p.dates.map((t, i) => `${x(t)},${y(p.p90[i])}`), lower = p.dates.map((t, i) => `${x(t)},${y(p.p10[i])}`).reverse();
          svg += `<polygon class="peers" points="${[...upper, ...lower].join(" ")}" fill="#9e9e9e" opacity="0.3"/>`;
          svg += `<polyline points="${p.dates.map((t, i) => `${x(t)},${y(p.p50[i])}`).join(" ")}" fill="none" stroke="#616161" stroke-dasharray="3 3"/>`;
        }
        const s = d.s2;
        const valid = s.dates.map((t, i) => [t, s.ndvi[i], i]).filter(([, v, i]) => v !== null && s.valid[i]);
        svg += `<polyline points="${valid.map(([t, v]) => `${x(t)},${y(v)}`).join(" ")}" fill="none" stroke="#2e7d32"/>`;
        s.dates.forEach((t, i) => {
          const v = s.ndvi[i];
          if (v === null) return;
          const share = s.unusable[i] === null ? "no SCL" : Math.round(s.unusable[i] * 100) + "% unusable";
          const verdict = s.valid[i] ? "valid" : "rejected" + (s.why && s.why[i] ? ": " + s.why[i] : "");
          const tip = esc(`${t} NDVI ${v.toFixed(3)} · ${verdict} (${share})${s.used[i] ? " · used by a marker" : ""}`);
          if (s.valid[i]) svg += `<circle class="obs valid" cx="${x(t)}" cy="${y(v)}" r="3.5" fill="#2e7d32"><title>${tip}</title></circle>`;
          else svg += `<path class="obs rejected" d="M${x(t) - 3},${y(v) - 3}l6,6m0,-6l-6,6" stroke="#757575" stroke-width="1.5"><title>${tip}</title></path>`;
          if (s.used[i]) svg += `<circle cx="${x(t)}" cy="${y(v)}" r="6.5" fill="none" stroke="#6a1b9a" stroke-width="1.5"><title>${tip}</title></circle>`;
        });
      } else if (panel.kind === "weather") {
        const bar = Math.max(1.5, ((W - L0 - R) / Math.max(1, (t1 - t0) / 864e5)) * 0.7);
        w.dates.forEach((t, i) => {
          const v = w.prec[i];
          if (v === null || v <= 0) return;
          svg += `<rect class="rain" x="${x(t) - bar / 2}" y="${y(v)}" width="${bar}" height="${Math.max(0.5, y(0) - y(v))}" fill="#1e88e5"><title>${t} precipitation ${v} mm</title></rect>`;
        });
        const temp = w.dates.map((t, i) => [t, w.tmean[i]]).filter(([, v]) => v !== null);
        svg += `<polyline class="temperature" points="${temp.map(([t, v]) => `${x(t)},${y(v)}`).join(" ")}" fill="none" stroke="#d84315"><title>mean temperature</title></polyline>`;
        svg += `<text x="${W - R - 4}" y="${top + 12}" text-anchor="end"><tspan fill="#1e88e5">rain</tspan> <tspan fill="#d84315">tmean</tspan></text>`;
      } else {
        const s = d[panel.kind];
        [["VV", "#1565c0"], ["VH", "#e65100"]].forEach(([band, c]) => {
          const pts = s.dates.map((t, i) => [t, s[band][i]]).filter(([, v]) => v !== null);
          svg += `<polyline points="${pts.map(([t, v]) => `${x(t)},${y(v)}`).join(" ")}" fill="none" stroke="${c}"/>`;
          pts.forEach(([t, v]) => (svg += `<circle class="obs" cx="${x(t)}" cy="${y(v)}" r="2.5" fill="${c}"><title>${t} ${band} ${v.toFixed(2)}</title></circle>`));
        });
        svg += `<text x="${W - R - 4}" y="${top + 12}" text-anchor="end"><tspan fill="#1565c0">VV</tspan> <tspan fill="#e65100">VH</tspan></text>`;
      }
    });
    const bottom = panels.length * (H + GAP) + 4;
    const first = new Date(t0), last = new Date(t1);
    for (let m = new Date(Date.UTC(first.getUTCFullYear(), first.getUTCMonth() + 1, 1)); m <= last; m.setUTCMonth(m.getUTCMonth() + 1)) {
      const t = m.toISOString().slice(0, 10);
      svg += `<text x="${x(t)}" y="${bottom}" text-anchor="middle">${t.slice(0, 7)}</text>`;
    }
    const legend = `<text x="${L0}" y="${bottom + 14}"><tspan fill="#2e7d32">● valid</tspan>  <tspan fill="#757575">✕ rejected</tspan>  <tspan fill="#6a1b9a">○ used by a marker</tspan>  <tspan fill="#d50000">┆ event</tspan></text>`;
    return `<svg class="series" viewBox="0 0 ${W} ${bottom + 20}" role="img" aria-label="Time series of parcel ${d.pid}">${svg}${legend}</svg>`;
  }

  // Backgrounds ---------------------------------------------------------------------------------
  function backgroundLayers() {
    const base = { "No background": L.layerGroup() };
    const messages = {};
    for (const layer of meta.backgrounds) {
      if (layer.kind === "xyz") {
        base[layer.name] = L.tileLayer(layer.url, { maxZoom: 20, crossOrigin: false });
      } else if (layer.message || !(layer.obsids || []).length) {
        base[layer.name + " (unavailable)"] = L.layerGroup();
        messages[layer.name + " (unavailable)"] = layer.message || `${layer.name}: no imagery`;
        continue;
      } else {
        const obsids = S.mode === "static" ? layer.exported || [] : layer.obsids;
        if (!obsids.length) {
          base[layer.name + " (not exported)"] = L.layerGroup();
          messages[layer.name + " (not exported)"] = `${layer.name}: no tiles in this export`;
          continue;
        }
        const date = (meta.dates.find((d) => d.obsid === obsids[0]) || { date: "" }).date;
        const name = `${layer.name} ${date}`.trim();
        const exported = S.mode === "static";
        base[name] = L.tileLayer(`${S.base}bg/${layer.id}/${obsids[0]}/{z}/{x}/{y}.png`, {
          maxZoom: 20,
          maxNativeZoom: exported ? 16 : 18,
          minNativeZoom: exported ? 13 : 10,
          bounds: exported ? meta.bounds : undefined, // an export has the tiles over the parcels only
        });
      }
    }
    for (const [name, layer] of Object.entries(base)) {
      if (!layer.on) continue;
      layer.on("tileerror", () => mapMessage(`${name}: background tiles not available here (service missing or outside the imagery)`));
      layer.on("add", () => mapMessage(messages[name] || ""));
    }
    return base;
  }

  let messageBox;
  function mapMessage(text) {
    if (!messageBox) {
      messageBox = L.control({ position: "bottomleft" });
      messageBox.onAdd = () => L.DomUtil.create("div", "map-message");
      messageBox.addTo(map);
    }
    const div = messageBox.getContainer();
    div.textContent = text;
    div.style.display = text ? "" : "none";
  }

  // Start ---------------------------------------------------------------------------------------
  function step(delta) {
    if (!filtered.length) return;
    current = current < 0 ? (delta > 0 ? 0 : filtered.length - 1) : (current + delta + filtered.length) % filtered.length;
    select(filtered[current]);
  }

  function fromHash() {
    const match = /pid=(-?\d+)/.exec(location.hash);
    if (!match) return;
    const row = index.row.get(+match[1]);
    if (row === undefined) status(`parcel ${match[1]} is not in this run`, true);
    else if (row !== selected) select(row);
  }

  async function start() {
    const canvas = document.createElement("canvas");
    if (!canvas.getContext || !canvas.getContext("2d")) {
      $("map").innerHTML = `<p class="message error">This browser cannot draw on a canvas, so the map is not shown; the list and the parcel panels still work.</p>`;
    }
    [meta, index] = await Promise.all([load("meta", "json"), load("index", "bin").then(decodeIndex)]);
    $("run-title").textContent = meta.title;
    map = L.map("map", { preferCanvas: true, zoomSnap: 1 });
    const base = backgroundLayers();
    const names = Object.keys(base);
    const initial = names.find((n) => n.startsWith("Sentinel-2 false colour") && !n.includes("(")) || names[0];
    base[initial].addTo(map);
    parcels = new ParcelLayer({ tileSize: 256, updateWhenZooming: false, zIndex: 10 }).addTo(map);
    L.control.layers(base, { Parcels: parcels }, { collapsed: true }).addTo(map);
    Object.assign(CBM, { map, index, meta, layers: base, select, rowOf: (pid) => index.row.get(pid) });
    L.control.scale({ imperial: false }).addTo(map);
    if (index.n) map.fitBounds(meta.bounds, { maxZoom: 17, animate: false });
    else map.setView([0, 0], 2);
    buildFilters();
    refilter();
    map.on("click", async (e) => {
      const row = await pick(e.latlng);
      if (row >= 0) select(row, { fly: false });
    });
    $("list").addEventListener("click", (e) => {
      const li = e.target.closest("li[data-row]");
      if (li) select(+li.dataset.row);
    });
    document.addEventListener("keydown", (e) => {
      if (e.target.matches("input, select, textarea")) return;
      if (e.key === "n" || e.key === "ArrowDown" || e.key === "j") (step(1), e.preventDefault());
      if (e.key === "p" || e.key === "ArrowUp" || e.key === "k") (step(-1), e.preventDefault());
    });
    window.addEventListener("hashchange", fromHash);
    const notes = [...(meta.notes || [])];
    if (!index.n) notes.push("This run has no parcels.");
    status(notes.join(" · ") || `${index.n} parcels`);
    parcels.once("load", () => {
      CBM.firstDrawMs = performance.now();
      CBM.ready = true;
    });
    fromHash();
  }

  start().catch((error) => {
    status(`cannot open the workbench: ${error.message}`, true);
    $("panel").innerHTML = `<p class="message error">${esc(error.message)}</p>`;
    CBM.error = error.message;
  });
})();
