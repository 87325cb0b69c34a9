"""HTML building blocks of the report: escaping and number formatting, the
JSON embedded for the page's script, notices, section and table wrappers,
inline SVG charts (signed bars, chain sparklines, the mode spectrum), and the
inlined CSS/JS assets of `spectro/assets/report/`.

Non-obvious choices:
- Every string from the run (token texts, config values) is HTML-escaped
  here or in the script; the embedded JSON has `<`, `>`, `&`, U+2028/9
  escaped so no token text can close the `<script>` element.
- Non-finite numbers become `null` in the embedded JSON (JSON.parse rejects
  NaN) and `–` in tables.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from spectro.report.loading import _num

ASSETS = Path(__file__).parent.parent / "assets" / "report"     # spectro/assets/report

# Section ids and headings, in page order (tests check them).
SECTIONS = (
    ("run", "Run configuration and provenance"),
    ("diagnostics", "Sampling diagnostics"),
    ("traces", "Chain traces"),
    ("modes", "Mode spectrum"),
    ("map", "Token map"),
    ("clusters", "Cluster gallery"),
    ("sae", "SAE validation"),
    ("control", "Against the nβ = 0 control"),
)
_TITLE = dict(SECTIONS)

CHAIN_COLOURS = ("#3b6fb6", "#2a9d8f", "#8e6bbf", "#e09f3e", "#5c8001", "#c05780", "#457b9d", "#9c6644")
DIVERGED_COLOUR = "#c62828"
POS_COLOUR, NEG_COLOUR = "#3b6fb6", "#d0643a"
MAX_SPECTRUM_BARS = 48
TRACE_MAX_POINTS = 400

_e = html.escape


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _e(str(x))
    if not math.isfinite(v):
        return "–" if math.isnan(v) else ("∞" if v > 0 else "−∞")
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -digits):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def _f2(x: Any) -> str:
    v = _num(x)
    return f"{v:.2f}" if math.isfinite(v) else "–"


def _vis(s: str) -> str:
    """HTML for a token text with whitespace made visible."""
    if s == "":
        return '<span class="ws">∅</span>'
    out = []
    for ch in s:
        if ch == " ":
            out.append('<span class="ws">·</span>')
        elif ch == "\n":
            out.append('<span class="ws">⏎</span>')
        elif ch == "\t":
            out.append('<span class="ws">⇥</span>')
        elif ch == "\r":
            out.append('<span class="ws">␍</span>')
        else:
            out.append(_e(ch))
    return "".join(out)


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)


def _script_json(obj: Any) -> str:
    """JSON for a <script type="application/json"> body: cannot close the element."""
    s = json.dumps(_clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _pretty_json(obj: Any) -> str:
    return _e(json.dumps(_clean(obj), indent=2, ensure_ascii=False))


def _notice(text: str) -> str:
    return f'<div class="notice">{_e(text)}</div>'


def _asset(name: str) -> str:
    text = (ASSETS / name).read_text(encoding="utf-8")
    for bad in ("</script", "<script", "<!--", "</style"):   # would end or confuse the inline element
        if bad in text.lower():
            raise ValueError(f"report asset {name} contains {bad!r}; it cannot be inlined")
    return text


def _section(key: str, body: str, lead: str = "") -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{key}"><h2>{_e(_TITLE[key])}</h2>{lead_html}{body}</section>'


def _kv_table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _rel_cell(v: float, target: float) -> str:
    if not math.isfinite(v):
        return '<td class="num">–</td>'
    if v < target:
        return f'<td class="num bad" title="below the target {_fmt(target, 2)}">{_f2(v)}</td>'
    return f'<td class="num">{_f2(v)}</td>'


def _bar_svg(values: Sequence[float], labels: Sequence[str], *, width: int = 520, height: int = 84,
             unit: str = "") -> str:
    """Signed bar chart (positive up, negative down) with rotated labels; per-chart scale."""
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    n = len(v)
    if n == 0:
        return ""
    m = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 0.0
    m = m if m > 0 else 1.0
    longest = max((len(s) for s in labels), default=1)
    fs = 10 if n <= 16 else 9
    rot = -90 if n > 24 else -60
    lab_h = int(min(70, 8 + 0.62 * fs * longest))
    pad_l, pad_r, top = 40, 6, 6
    W, H = width, height + lab_h
    plot_w = W - pad_l - pad_r
    step = min(plot_w / n, 34.0)            # few components: narrow bars on the left
    bw = max(1.0, step * 0.72)
    mid = top + height / 2
    half = height / 2 - 2
    parts = [f'<svg class="bars" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">',
             f'<line class="axis" x1="{pad_l}" x2="{pad_l + step * n:.1f}" y1="{mid:.1f}" y2="{mid:.1f}"/>',
             f'<text class="tick" x="{pad_l - 4}" y="{top + 8}" text-anchor="end">+{_fmt(m, 2)}</text>',
             f'<text class="tick" x="{pad_l - 4}" y="{top + height}" text-anchor="end">−{_fmt(m, 2)}</text>']
    for i, (x, name) in enumerate(zip(v, labels)):
        cx = pad_l + step * (i + 0.5)
        if np.isfinite(x):
            h = abs(x) / m * half
            y = mid - h if x >= 0 else mid
            colour = POS_COLOUR if x >= 0 else NEG_COLOUR
            parts.append(f'<rect x="{cx - bw / 2:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{max(h, 0.5):.1f}" '
                         f'fill="{colour}"><title>{_e(name)}: {_fmt(x)}{_e(unit)}</title></rect>')
        ly = top + height + 6
        parts.append(f'<text class="lab" font-size="{fs}" transform="translate({cx + 3:.1f},{ly}) rotate({rot})" '
                     f'text-anchor="end">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _segments(values: np.ndarray, stride: int, xy) -> list[list[str]]:
    """The "x,y" points of one chain's trace every `stride` draws (and its last), split where it is not finite."""
    n_draw = values.shape[0]
    idx = np.arange(0, n_draw, stride)
    if n_draw - 1 not in idx:
        idx = np.append(idx, n_draw - 1)
    pts, segs = [], []
    for d in idx:
        v = values[d]
        if np.isfinite(v):
            pts.append("%.1f,%.1f" % xy(d, v))
        elif pts:
            segs.append(pts)
            pts = []
    if pts:
        segs.append(pts)
    return segs


def _sparkline(phi: np.ndarray, diverged: np.ndarray, *, width: int = 300, height: int = 90) -> str:
    """phi (chain, draw): one polyline per chain on a shared y-range."""
    n_chain, n_draw = phi.shape
    stride = max(1, int(math.ceil(n_draw / TRACE_MAX_POINTS)))
    finite = phi[np.isfinite(phi)]
    if finite.size == 0:
        return '<div class="muted small">no finite draws yet</div>'
    lo, hi = float(np.min(finite)), float(np.max(finite))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad_l, pad_b, top = 46, 14, 6
    pw, ph = width - pad_l - 4, height - pad_b - top

    def xy(d, v):
        x = pad_l + (d / max(n_draw - 1, 1)) * pw
        y = top + (1 - (v - lo) / (hi - lo)) * ph
        return x, y

    parts = [f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             f'<rect x="{pad_l}" y="{top}" width="{pw}" height="{ph}" class="plotbg"/>',
             f'<text class="tick" x="{pad_l - 3}" y="{top + 8}" text-anchor="end">{_fmt(hi, 3)}</text>',
             f'<text class="tick" x="{pad_l - 3}" y="{top + ph}" text-anchor="end">{_fmt(lo, 3)}</text>',
             f'<text class="tick" x="{pad_l}" y="{height - 2}">0</text>',
             f'<text class="tick" x="{width - 4}" y="{height - 2}" text-anchor="end">draw {n_draw - 1}</text>']
    if lo < 0 < hi:
        _, y0 = xy(0, 0.0)
        parts.append(f'<line class="zero" x1="{pad_l}" x2="{pad_l + pw}" y1="{y0:.1f}" y2="{y0:.1f}"/>')
    order = [k for k in range(n_chain) if diverged[k] < 0] + [k for k in range(n_chain) if diverged[k] >= 0]
    for k in order:
        div = int(diverged[k])
        colour = DIVERGED_COLOUR if div >= 0 else CHAIN_COLOURS[k % len(CHAIN_COLOURS)]
        segs = _segments(phi[k], stride, xy)
        cls = "line diverged" if div >= 0 else "line"
        title = f"chain {k}" + (f" (diverged at draw {div})" if div >= 0 else "")
        for seg in segs:
            if len(seg) == 1:
                x, y = seg[0].split(",")
                parts.append(f'<circle cx="{x}" cy="{y}" r="1.5" fill="{colour}"><title>{title}</title></circle>')
            else:
                parts.append(f'<polyline class="{cls}" stroke="{colour}" points="{" ".join(seg)}">'
                             f'<title>{title}</title></polyline>')
        if div >= 0:
            fin = np.nonzero(np.isfinite(phi[k, : div + 1]))[0]
            if fin.size:
                x, y = xy(int(fin[-1]), float(phi[k, fin[-1]]))
                parts.append(f'<text class="xmark" x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" '
                             f'fill="{DIVERGED_COLOUR}">✕<title>{title}</title></text>')
    parts.append("</svg>")
    return "".join(parts)


def _spectrum_svg(share: Sequence[float], cum: Sequence[float], *, width: int = 760, height: int = 200) -> str:
    share = [0.0 if x is None else float(x) for x in share][:MAX_SPECTRUM_BARS]
    cum = [0.0 if x is None else float(x) for x in cum][: len(share)]
    n = len(share)
    if n == 0:
        return ""
    pad_l, pad_r, top, pad_b = 44, 44, 10, 26
    pw, ph = width - pad_l - pad_r, height - top - pad_b
    m = max(max(share), 1e-12)
    step = min(pw / n, 40.0)
    bw = step * 0.7
    parts = [f'<svg class="spectrum" viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             f'<line class="axis" x1="{pad_l}" x2="{pad_l + step * n:.1f}" y1="{top + ph}" y2="{top + ph}"/>',
             f'<text class="tick" x="{pad_l - 4}" y="{top + 8}" text-anchor="end">{100 * m:.1f}%</text>',
             f'<text class="tick" x="{pad_l - 4}" y="{top + ph}" text-anchor="end">0</text>',
             f'<text class="tick cum" x="{pad_l + step * n + 4:.1f}" y="{top + 8}">100%</text>',
             f'<text class="tick cum" x="{pad_l + step * n + 4:.1f}" y="{top + ph}">0%</text>',
             f'<text class="tick" x="{pad_l + step * n / 2:.1f}" y="{height - 2}" text-anchor="middle">mode</text>']
    for i, x in enumerate(share):
        h = x / m * ph
        parts.append(f'<rect x="{pad_l + i * step + (step - bw) / 2:.1f}" y="{top + ph - h:.1f}" width="{bw:.1f}" '
                     f'height="{max(h, 0.5):.1f}" fill="{POS_COLOUR}"><title>mode {i}: {100 * x:.2f}% of variance'
                     f'{f", cumulative {100 * cum[i]:.1f}%" if i < len(cum) else ""}</title></rect>')
        if n <= 24 or i % 5 == 0:
            parts.append(f'<text class="tick" x="{pad_l + (i + 0.5) * step:.1f}" y="{top + ph + 11}" '
                         f'text-anchor="middle">{i}</text>')
    if cum:
        pts = " ".join(f"{pad_l + (i + 0.5) * step:.1f},{top + ph - c * ph:.1f}" for i, c in enumerate(cum))
        parts.append(f'<polyline class="cumline" points="{pts}"/>')
        parts.extend(f'<circle class="cumdot" cx="{pad_l + (i + 0.5) * step:.1f}" cy="{top + ph - c * ph:.1f}" r="2">'
                     f'<title>cumulative {100 * c:.1f}% after mode {i}</title></circle>' for i, c in enumerate(cum))
    parts.append("</svg>")
    return "".join(parts)
