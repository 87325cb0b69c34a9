/* spectro report: token map (canvas) and cluster gallery, rendered from the
   JSON in the element with id "report-data". Inlined into report.html; no network. */
(function () {
  "use strict";
  var errBox = document.getElementById("js-errors");
  window.addEventListener("error", function (e) {
    if (!errBox) return;
    errBox.hidden = false;
    errBox.textContent = "The report's script failed (" + (e.message || "unknown error") +
      "); the map or the gallery may be incomplete.";
  });

  // sections fold on a click on their heading; ?fold=run,traces folds some from the start
  var folded = {};
  try {
    (new URLSearchParams(window.location.search).get("fold") || "").split(",").forEach(function (k) {
      if (k) folded[k.trim()] = true;
    });
  } catch (e) { /* no URLSearchParams */ }
  Array.prototype.forEach.call(document.querySelectorAll("main > section"), function (sec) {
    var h = sec.querySelector("h2");
    if (!h) return;
    h.title = "click to fold or unfold";
    if (folded[sec.id]) sec.classList.add("folded");
    h.addEventListener("click", function () {
      sec.classList.toggle("folded");
      if (sec.id === "map" && !sec.classList.contains("folded") && mapDraw) mapDraw();
    });
  });

  var D = JSON.parse(document.getElementById("report-data").textContent);
  var G = D.gallery;                       // null when clusters.json is missing
  var SOURCES = D.sources || [];
  var SRC_COLOURS = ["#3b6fb6", "#e09f3e", "#2a9d8f", "#c05780", "#8e6bbf", "#5c8001", "#9c6644", "#457b9d"];

  // ------------------------------------------------------------------ text
  var ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  function esc(s) { return String(s).replace(/[&<>"']/g, function (c) { return ESC[c]; }); }
  var WS = { " ": "·", "\n": "⏎", "\t": "⇥", "\r": "␍" };
  function vis(s) {                         // escaped, whitespace made visible
    s = String(s);
    if (s === "") return '<span class="ws">∅</span>';
    var out = "", run = "";
    for (var i = 0; i < s.length; i++) {
      var c = s[i], w = WS[c];
      if (w) { run += w; continue; }
      if (run) { out += '<span class="ws">' + run + "</span>"; run = ""; }
      out += ESC[c] || c;
    }
    if (run) out += '<span class="ws">' + run + "</span>";
    return out;
  }
  function fmt(x, d) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    return Number(x).toFixed(d === undefined ? 3 : d);
  }

  // ---------------------------------------------------------------- colours
  var rankOf = {};                          // cluster id -> rank by size (largest first)
  if (G) G.clusters.forEach(function (c, i) { rankOf[c.id] = i; });
  function colourOf(id) {
    if (id === null || id === undefined || id < 0 || rankOf[id] === undefined) return "#b8bec4";
    var r = rankOf[id];
    var hue = (r * 137.508 + 210) % 360;
    var light = 42 + (r % 3) * 8;
    return "hsl(" + hue.toFixed(1) + ",62%," + light + "%)";
  }

  // -------------------------------------------------------------- the map
  var M = D.map, mapHighlight = null, mapDraw = null;
  (function initMap() {
    var canvas = document.getElementById("map-canvas");
    if (!canvas) return;
    if (!M || !M.x || M.x.length === 0) { canvas.parentNode.hidden = true; return; }
    mapDraw = function () { draw(); };
    var n = M.x.length, tip = document.getElementById("map-tip"), clear = document.getElementById("map-clear");
    var px = new Float32Array(n), py = new Float32Array(n), grid = {}, CELL = 12, W = 0, H = 0;
    var order = [];                          // noise first, then small clusters, large clusters last
    for (var i = 0; i < n; i++) order.push(i);
    order.sort(function (a, b) {
      var ra = M.lab[a] < 0 ? 1e9 : rankOf[M.lab[a]], rb = M.lab[b] < 0 ? 1e9 : rankOf[M.lab[b]];
      return rb - ra;
    });
    var radius = n > 8000 ? 1.6 : n > 2000 ? 2.2 : 3;

    function draw() {
      var dpr = window.devicePixelRatio || 1, rect = canvas.getBoundingClientRect();
      W = rect.width; H = rect.height;
      if (!W || !H) return;                  // folded: drawn when unfolded
      canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
      var ctx = canvas.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, W, H);
      var pad = 18;
      grid = {};
      for (var k = 0; k < n; k++) {
        var i = order[k];
        px[i] = pad + (M.x[i] / 10000) * (W - 2 * pad);
        py[i] = pad + (1 - M.y[i] / 10000) * (H - 2 * pad);
        var key = Math.floor(px[i] / CELL) + ":" + Math.floor(py[i] / CELL);
        (grid[key] = grid[key] || []).push(i);
      }
      var passes = mapHighlight === null ? [false] : [false, true];
      passes.forEach(function (hot) {
        for (var k = 0; k < n; k++) {
          var i = order[k], lab = M.lab[i], isHot = mapHighlight !== null && lab === mapHighlight;
          if (hot !== isHot) continue;
          if (mapHighlight !== null && !isHot) { ctx.fillStyle = "#dde1e5"; ctx.globalAlpha = 0.6; }
          else { ctx.fillStyle = colourOf(lab); ctx.globalAlpha = lab < 0 ? 0.45 : 0.8; }
          ctx.beginPath();
          ctx.arc(px[i], py[i], isHot ? radius + 1 : (lab < 0 ? radius * 0.8 : radius), 0, 6.2832);
          ctx.fill();
        }
      });
      ctx.globalAlpha = 1;
      ctx.fillStyle = "#8c959f"; ctx.font = "11px system-ui, sans-serif";
      var ax = M.ax || ["PC1", "PC2"];
      ctx.textAlign = "right"; ctx.fillText(ax[0] + " →", W - 6, H - 6); ctx.textAlign = "left";
      ctx.save(); ctx.translate(12, 50); ctx.rotate(-Math.PI / 2); ctx.textAlign = "right";
      ctx.fillText(ax[1] + " →", 10, 0); ctx.restore();
      clear.hidden = mapHighlight === null;
    }

    function nearest(x, y) {
      var cx = Math.floor(x / CELL), cy = Math.floor(y / CELL), best = -1, bd = 64;
      for (var dx = -1; dx <= 1; dx++) for (var dy = -1; dy <= 1; dy++) {
        var cell = grid[(cx + dx) + ":" + (cy + dy)];
        if (!cell) continue;
        for (var j = 0; j < cell.length; j++) {
          var i = cell[j], d = (px[i] - x) * (px[i] - x) + (py[i] - y) * (py[i] - y);
          if (d < bd) { bd = d; best = i; }
        }
      }
      return best;
    }
    canvas.addEventListener("mousemove", function (ev) {
      var r = canvas.getBoundingClientRect(), x = ev.clientX - r.left, y = ev.clientY - r.top, i = nearest(x, y);
      if (i < 0) { tip.hidden = true; return; }
      var lab = M.lab[i];
      tip.innerHTML = '<span class="tok">' + vis(M.tt[M.ti[i]]) + "</span> " +
        (lab < 0 ? "noise" : "cluster #" + lab) +
        (M.si.length ? " · " + esc(SOURCES[M.si[i]] || "") : "") +
        (M.ctx.length ? ' <span style="opacity:.7">ctx ' + M.ctx[i] + ":" + M.pos[i] + "</span>" : "");
      tip.hidden = false;
      var wrap = canvas.parentNode.getBoundingClientRect();
      var left = ev.clientX - wrap.left + 14, top = ev.clientY - wrap.top + 14;
      if (left + tip.offsetWidth > wrap.width - 4) left = ev.clientX - wrap.left - tip.offsetWidth - 14;
      tip.style.left = left + "px"; tip.style.top = top + "px";
    });
    canvas.addEventListener("mouseleave", function () { tip.hidden = true; });
    canvas.addEventListener("click", function (ev) {
      var r = canvas.getBoundingClientRect(), i = nearest(ev.clientX - r.left, ev.clientY - r.top);
      if (i < 0 || M.lab[i] < 0 || !G) return;
      showCluster(M.lab[i]);
    });
    clear.addEventListener("click", function () { mapHighlight = null; draw(); });

    var legend = document.getElementById("map-legend");
    if (G && G.clusters.length) {
      var items = G.clusters.slice(0, 14).map(function (c) {
        return '<span class="lg" data-id="' + c.id + '"><span class="sw" style="background:' + colourOf(c.id) +
          '"></span>#' + c.id + " (" + c.size + ")</span>";
      });
      if (G.clusters.length > 14) items.push('<span class="muted">… ' + (G.clusters.length - 14) + " more</span>");
      items.push('<span><span class="sw" style="background:#b8bec4"></span>noise</span>');
      legend.innerHTML = items.join("");
      legend.addEventListener("click", function (ev) {
        var el = ev.target.closest(".lg");
        if (el) { mapHighlight = Number(el.getAttribute("data-id")); draw(); }
      });
    }
    var pending = null;
    window.addEventListener("resize", function () { clearTimeout(pending); pending = setTimeout(draw, 100); });
    draw();
  })();

  // ---------------------------------------------------------- the gallery
  if (!G) return;
  var COMPS = G.components || [];
  var WIDE = COMPS.length > 12;             // many components: the profile gets the card's full width
  var PLABEL = "profile: " + esc(G.plabel || "mean z-scored χ per component");
  var PAGE = Math.max(1, D.page_size || 25);
  var state = { q: "", min: 0, sort: "size", page: 0 };
  var lowerTexts = G.clusters.map(function (c) { return c.texts.map(function (t) { return t.toLowerCase(); }); });
  var byId = {};
  G.clusters.forEach(function (c, i) { byId[c.id] = i; });
  var qEl = document.getElementById("q"), minEl = document.getElementById("minsize"),
      sortEl = document.getElementById("sort"), cardsEl = document.getElementById("cards"),
      countEl = document.getElementById("count");

  function normQuery(q) {                   // the visible forms of whitespace also match
    return q.replace(/·/g, " ").replace(/⏎/g, "\n").replace(/⇥/g, "\t").toLowerCase();
  }
  function matches(i, q) {
    if (!q) return true;
    var m = /^#(\d+)$/.exec(q.trim());
    if (m) return G.clusters[i].id === Number(m[1]);
    var ts = lowerTexts[i];
    for (var j = 0; j < ts.length; j++) if (ts[j].indexOf(q) >= 0) return true;
    return false;
  }
  function filtered() {
    var q = normQuery(state.q), out = [];
    for (var i = 0; i < G.clusters.length; i++) {
      if (G.clusters[i].size >= state.min && matches(i, q)) out.push(i);
    }
    if (state.sort === "cond") {
      out.sort(function (a, b) {
        var ca = G.clusters[a].cond, cb = G.clusters[b].cond;
        return (ca === null ? 1e9 : ca) - (cb === null ? 1e9 : cb) || a - b;
      });
    } else if (state.sort === "id") {
      out.sort(function (a, b) { return G.clusters[a].id - G.clusters[b].id; });
    }
    return out;
  }

  function profileSvg(profile, W) {
    var n = profile.length, rot = n > 24 ? -90 : -60;
    if (!n) return '<div class="muted small">no profile</div>';
    var m = 0;
    profile.forEach(function (v) { if (v !== null && Math.abs(v) > m) m = Math.abs(v); });
    if (!(m > 0)) m = 1;
    var longest = 1;
    COMPS.forEach(function (s) { longest = Math.max(longest, String(s).length); });
    var fs = n <= 16 ? 10 : 9, labH = Math.min(64, 8 + 0.62 * fs * longest);
    var h = 78, padL = 34, top = 4, plotW = W - padL - 4, step = Math.min(plotW / n, 34), bw = Math.max(1, step * 0.72);
    var mid = top + h / 2, half = h / 2 - 2, H = top + h + labH, x1 = padL + step * n;
    var s = '<svg class="bars" viewBox="0 0 ' + W + " " + H + '" width="' + W + '" height="' + H + '">' +
      '<line class="axis" x1="' + padL + '" x2="' + x1.toFixed(1) + '" y1="' + mid + '" y2="' + mid + '"/>' +
      '<text class="tick" x="' + (padL - 3) + '" y="' + (top + 8) + '" text-anchor="end">+' + fmt(m, 2) + "</text>" +
      '<text class="tick" x="' + (padL - 3) + '" y="' + (top + h) + '" text-anchor="end">−' + fmt(m, 2) + "</text>";
    for (var i = 0; i < n; i++) {
      var v = profile[i], cx = padL + step * (i + 0.5), name = esc(COMPS[i] === undefined ? i : COMPS[i]);
      if (v !== null) {
        var bh = Math.max(0.5, Math.abs(v) / m * half), y = v >= 0 ? mid - bh : mid;
        s += '<rect x="' + (cx - bw / 2).toFixed(1) + '" y="' + y.toFixed(1) + '" width="' + bw.toFixed(1) +
          '" height="' + bh.toFixed(1) + '" fill="' + (v >= 0 ? "#3b6fb6" : "#d0643a") + '"><title>' + name +
          ": " + fmt(v, 3) + "</title></rect>";
      }
      s += '<text class="lab" font-size="' + fs + '" transform="translate(' + (cx + 3).toFixed(1) + "," +
        (top + h + 6) + ') rotate(' + rot + ')" text-anchor="end">' + name + "</text>";
    }
    return s + "</svg>";
  }

  function sourceMix(src) {
    var total = 0;
    src.forEach(function (k) { total += k; });
    if (!total) return '<div class="muted small">–</div>';
    var bar = "", leg = "";
    src.forEach(function (k, j) {
      if (!k) return;
      var col = SRC_COLOURS[j % SRC_COLOURS.length], pct = 100 * k / total;
      bar += '<span style="width:' + pct.toFixed(2) + "%;background:" + col + '" title="' + esc(SOURCES[j]) + ": " +
        k + '"></span>';
      leg += '<span class="sw" style="background:' + col + '"></span>' + esc(SOURCES[j]) + " " + pct.toFixed(0) + "%";
    });
    return '<div class="srcbar">' + bar + '</div><div class="srcleg">' + leg + "</div>";
  }

  function roleMix(roles, size) {
    if (!roles || !roles.length || !size) return "";
    return '<div class="label" title="rule-based token roles (spectro/roles.py); the most common four">' +
      "token roles</div>" +
      '<div class="srcleg">' + roles.map(function (r) {
        return esc(r[0]) + " " + (100 * r[1] / size).toFixed(0) + "%";
      }).join(" · ") + "</div>";
  }

  function card(i, q) {
    var c = G.clusters[i], col = colourOf(c.id);
    var top = c.top.map(function (tc) {
      var hit = q && String(tc[0]).toLowerCase().indexOf(q) >= 0;
      return '<span class="chip' + (hit ? " hit" : "") + '"><span class="tok">' + vis(tc[0]) +
        '</span><span class="cnt">' + tc[1] + "</span></span>";
    }).join("");
    var extra = "";
    if (q && !/^#\d+$/.test(q.trim())) {
      var shown = {};
      c.top.forEach(function (tc) { shown[String(tc[0]).toLowerCase()] = 1; });
      var more = c.texts.filter(function (t, j) {
        return lowerTexts[i][j].indexOf(q) >= 0 && !shown[lowerTexts[i][j]];
      });
      if (more.length) {
        extra = '<div class="matches">also matching: ' + more.slice(0, 8).map(function (t) {
          return '<span class="chip hit"><span class="tok">' + vis(t) + "</span></span>";
        }).join("") + (more.length > 8 ? " … " + (more.length - 8) + " more" : "") + "</div>";
      }
    }
    var ex = c.ex.map(function (e) {
      return '<li><span class="l"><span>' + vis(e[0]) + '</span></span><mark>' + vis(e[1]) + '</mark><span class="r">' +
        vis(e[2]) + '</span><span class="where">' + esc(e[3] >= 0 ? SOURCES[e[3]] || "" : "") + " " + e[4] + ":" +
        e[5] +
        "</span></li>";
    }).join("");
    return '<article class="card" id="cluster-' + c.id + '" style="--c:' + col + '">' +
      "<header><h3>Cluster #" + c.id + '</h3><span class="badge">' + c.size + " tokens</span>" +
      '<span class="badge" title="conductance: cut / min(vol S, vol rest); lower is a cleaner cluster">conductance ' +
      fmt(c.cond, 3) + '</span><span class="spacer"></span>' +
      '<button type="button" class="onmap" data-id="' + c.id + '">show on map</button></header>' +
      (WIDE ?
        '<div class="label">top tokens</div>' + top + extra + '<div class="label">sources</div>' + sourceMix(c.src) +
        roleMix(c.roles, c.size) +
        '<div class="label">' + PLABEL + '</div>' + profileSvg(c.profile, 570) :
        '<div class="row"><div><div class="label">top tokens</div>' + top + extra +
        '<div class="label">sources</div>' + sourceMix(c.src) + roleMix(c.roles, c.size) + "</div>" +
        '<div><div class="label">' + PLABEL + '</div>' + profileSvg(c.profile, 290) +
        "</div></div>") +
      '<div class="label">typical contexts</div>' +
      (ex ? '<ol class="examples">' + ex + "</ol>" : '<div class="muted small">no contexts available</div>') +
      "</article>";
  }

  function pager(el, page, pages) {
    el.innerHTML = pages <= 1 ? "" :
      '<button type="button" data-p="0"' + (page === 0 ? " disabled" : "") + ">« first</button>" +
      '<button type="button" data-p="' + (page - 1) + '"' + (page === 0 ? " disabled" : "") + ">‹ prev</button>" +
      "<span>page " + (page + 1) + " of " + pages + "</span>" +
      '<button type="button" data-p="' + (page + 1) + '"' + (page >= pages - 1 ? " disabled" : "") +
      ">next ›</button>" +
      '<button type="button" data-p="' + (pages - 1) + '"' + (page >= pages - 1 ? " disabled" : "") +
      ">last »</button>";
  }

  function render() {
    var list = filtered(), pages = Math.max(1, Math.ceil(list.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    var q = normQuery(state.q), from = state.page * PAGE, slice = list.slice(from, from + PAGE);
    cardsEl.innerHTML = slice.length ? slice.map(function (i) { return card(i, q); }).join("") :
      '<div class="empty">No cluster matches.</div>';
    countEl.textContent = list.length === G.clusters.length ?
      G.clusters.length + " clusters" :
      list.length + " of " + G.clusters.length + " clusters match";
    if (slice.length) countEl.textContent += " · showing " + (from + 1) + "–" + (from + slice.length);
    pager(document.getElementById("pager-top"), state.page, pages);
    pager(document.getElementById("pager-bot"), state.page, pages);
    cardsEl.setAttribute("data-rendered", String(slice.length));
  }

  function showCluster(id) {
    state.q = "#" + id; qEl.value = state.q; state.min = 0; minEl.value = "0"; state.page = 0;
    render();
    document.getElementById("clusters").scrollIntoView();
  }

  var debounce = null;
  qEl.addEventListener("input", function () {
    clearTimeout(debounce);
    debounce = setTimeout(function () { state.q = qEl.value; state.page = 0; render(); }, 120);
  });
  minEl.addEventListener("input", function () { state.min = Number(minEl.value) || 0; state.page = 0; render(); });
  sortEl.addEventListener("change", function () { state.sort = sortEl.value; state.page = 0; render(); });
  document.getElementById("clusters").addEventListener("click", function (ev) {
    var b = ev.target.closest("button[data-p]");
    if (b && !b.disabled) {
      state.page = Number(b.getAttribute("data-p")); render();
      document.getElementById("clusters").scrollIntoView();
      return;
    }
    var m = ev.target.closest("button.onmap");
    if (m && mapDraw) {
      mapHighlight = Number(m.getAttribute("data-id"));
      document.getElementById("map").classList.remove("folded");
      mapDraw();
      document.getElementById("map").scrollIntoView();
    }
  });
  // initial state from the address: report.html?q=def&min=10&sort=cond&page=2 (links can be shared)
  try {
    var params = new URLSearchParams(window.location.search);
    if (params.has("q")) { state.q = params.get("q"); qEl.value = state.q; }
    if (params.has("min")) { state.min = Number(params.get("min")) || 0; minEl.value = String(state.min); }
    if (params.get("sort") === "cond" || params.get("sort") === "id") {
      state.sort = params.get("sort"); sortEl.value = state.sort;
    }
    if (params.has("page")) state.page = Math.max(0, (Number(params.get("page")) || 1) - 1);
  } catch (e) { /* no URLSearchParams: start unfiltered */ }
  render();
  // the map and the cards change the layout after the browser jumped to #anchor: jump again
  if (window.location.hash.length > 1) {
    var target = document.getElementById(decodeURIComponent(window.location.hash.slice(1)));
    if (target) target.scrollIntoView();
  }
})();
