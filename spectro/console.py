"""What the terminal shows: one live progress bar while sampling, one line per later stage, a short summary at
the end. spectro.log (Hydra's log file in the run directory) keeps everything, summary.json every figure.

The main job (spectro.cli) calls `setup(config.console)` once the config is read:

- `console.progress=auto` draws the bar when stderr is a terminal and writes a plain progress line every 10 s
  otherwise (CI, `ray job submit` logs, a pipe), as log records in Hydra's format; `bar` and `plain` force one.
- Records of other libraries (Ray, Ray Data, faiss, numba, urllib3, Hydra, ...) below WARNING go to spectro.log
  only; WARNING and above reach the terminal too. Two exceptions, to spectro.log only at every level: Ray's
  notice that token authentication is on (or off) for the local instance, which spectro starts for itself on
  loopback without a dashboard, so the notice asks nothing of the user; and Ray Data's notices about its own
  progress display ("Progress bars disabled ..."), which spectro turns off on purpose.
- Ray and Ray Data give their loggers handlers of their own that write to the terminal and do not pass records
  on. `route_third_party` removes such handlers, so their records reach the root logger and the rules above.
  Importing Ray, and again importing Ray Data, installs them, so the pipeline calls it after importing the
  service and the covariance job after importing Ray Data. Ray Data's own progress bars are off
  (spectro.susceptibilities).
- spectro's own records logged with `extra=FILE_ONLY` go to spectro.log only: the periodic progress lines while
  the bar shows the same numbers, and the verdict line that the final summary repeats.
- On a terminal, log lines print above the bar (`tqdm.write`) and without Hydra's timestamp prefix; spectro.log
  keeps the prefix. Python warnings become log records (`logging.captureWarnings`), so they reach spectro.log
  and do not break the bar.
- Ray's forwarding of actor output to the driver (`log_to_driver`) stays on: an actor prints nothing in a
  healthy run, and what it prints when it fails belongs on the terminal.
- At the end spectro.cli prints `summary_lines` (known answers, figures, verdict with its reasons, paths), the
  verdict within the last ten lines; `console.summary=full` prints summary.json as JSON before them.

Why tqdm and not rich: tqdm comes with transformers and huggingface_hub already, draws a bar with rate and ETA
from counts alone (the service's store reads), and its `write` prints log lines above a live bar through a plain
logging handler; rich would add a second console object and its own handler stack for the same single bar.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional, Protocol

from spectro.config import ConsoleConfig

log = logging.getLogger("spectro.progress")

FILE_ONLY = {"console": False}          # `log.info(..., extra=FILE_ONLY)`: spectro.log, not the terminal
# third-party loggers kept off the terminal at every level (module notes)
QUIET = ("ray._private.authentication", "ray.data._internal.progress")
OWN = "spectro"
PLAIN_EVERY_S = 10.0                    # between progress lines in a log
BAR_EVERY_S = 2.0                       # between store reads while the bar is drawn

_mode: Optional[str] = None             # "bar" | "plain" once `setup` ran


def progress_text(done: int, total: int, rate: float, eta: float) -> str:
    """One progress line: counts, share, rate and ETA (or "warming up" before the first draw lands)."""
    if not math.isfinite(eta):
        return f"sampling {done}/{total} chain-draws, warming up"
    return (f"sampling {done}/{total} chain-draws ({100 * done / total:.0f}%), "
            f"{rate:.2f} draws/s, ETA {eta:.0f}s")


class ProgressView(Protocol):
    every_s: float                      # how often the caller should read the progress and call `show`

    def show(self, done: int, total: int, rate: float, eta: float, final: bool = False) -> None: ...

    def close(self) -> None: ...


class PlainProgress:
    """A log line per call, every `every_s` seconds: a log file reads them in order."""

    def __init__(self, every_s: float = PLAIN_EVERY_S):
        self.every_s = every_s

    def show(self, done: int, total: int, rate: float, eta: float, final: bool = False) -> None:
        log.info(progress_text(done, total, rate, eta))

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar on `stream` (stderr), redrawn at each call; the same plain line goes to spectro.log every
    `log_every_s` seconds and at the end."""

    def __init__(self, stream=None, every_s: float = BAR_EVERY_S, log_every_s: float = PLAIN_EVERY_S):
        self.stream, self.every_s, self.log_every_s = stream or sys.stderr, every_s, log_every_s
        self.bar = None
        self.logged = -math.inf

    def show(self, done: int, total: int, rate: float, eta: float, final: bool = False) -> None:
        from tqdm import tqdm

        if self.bar is None:                # the first call's count is where a resumed run starts
            self.bar = tqdm(total=total, initial=done, desc="sampling", unit=" draws", file=self.stream,
                            dynamic_ncols=True, mininterval=0, smoothing=0.3,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} chain-draws "
                                       "[{elapsed}<{remaining}, {rate_fmt}]")
        self.bar.update(done - self.bar.n)
        now = time.monotonic()
        if final or now - self.logged >= self.log_every_s:
            log.info(progress_text(done, total, rate, eta), extra=FILE_ONLY)
            self.logged = now
        if final:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resolve(progress: str = "auto", stream=None) -> str:
    """"bar" or "plain" for a `console.progress` setting: auto draws the bar when `stream` (stderr) is a terminal."""
    if progress != "auto":
        return progress
    stream = stream or sys.stderr
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "plain"


def progress_view(progress: Optional[str] = None) -> ProgressView:
    """The view for `console.progress` (default: what `setup` chose, else auto)."""
    mode = resolve(progress) if progress is not None else (_mode or resolve())
    return BarProgress() if mode == "bar" else PlainProgress()


# ---------------------------------------------------------------- where log records go

def _terminal_handler(h: logging.Handler) -> bool:
    """A handler writing to the process's stdout or stderr (not a file)."""
    return (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and getattr(h, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


class TerminalFilter(logging.Filter):
    """What of a record reaches the terminal (module notes); spectro.log's handler has no such filter."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        if record.name == OWN or record.name.startswith(OWN + "."):
            return True
        return record.levelno >= logging.WARNING and not record.name.startswith(QUIET)


class TerminalFormatter(logging.Formatter):
    """The message alone; a warning or error says so, and a third-party one names its logger."""

    def __init__(self):
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno < logging.WARNING:
            return text
        own = record.name == OWN or record.name.startswith(OWN + ".")
        return f"{record.levelname.lower()}{'' if own else f' ({record.name})'}: {text}"


class BarHandler(logging.StreamHandler):
    """Writes each record with `tqdm.write`, which lifts a live bar above it and draws it again below."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:                   # logging's own contract: a failing handler reports, never raises
            self.handleError(record)


def setup(settings: Optional[ConsoleConfig] = None) -> str:
    """Apply the terminal rules (module notes) to the root logger's terminal handlers (Hydra's console handler);
    returns the progress mode, "bar" or "plain". Idempotent."""
    global _mode
    _mode = resolve((settings or ConsoleConfig()).progress)
    root = logging.getLogger()
    for h in list(root.handlers):
        if not _terminal_handler(h):
            continue
        if _mode == "bar" and not isinstance(h, BarHandler):
            bar = BarHandler(h.stream)
            bar.setLevel(h.level)
            root.removeHandler(h)
            root.addHandler(bar)
            h = bar
        if isinstance(h, BarHandler):
            h.setFormatter(TerminalFormatter())
        if not any(isinstance(f, TerminalFilter) for f in h.filters):
            h.addFilter(TerminalFilter())
    logging.captureWarnings(True)
    route_third_party()
    return _mode


def route_third_party() -> None:
    """Loggers of other libraries with their own terminal handlers (Ray's, Ray Data's): drop those handlers and
    pass records on to the root logger, at INFO and above. Does nothing before `setup`."""
    if _mode is None:
        return
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger) or name == OWN or name.startswith(OWN + "."):
            continue
        own_terminal = [h for h in lg.handlers if _terminal_handler(h)]
        if not own_terminal:
            continue
        for h in own_terminal:
            lg.removeHandler(h)
        lg.propagate = True
        if lg.level < logging.INFO:         # Ray Data logs DEBUG into its own files; spectro.log takes INFO
            lg.setLevel(logging.INFO)


# ---------------------------------------------------------------- the summary at the end

def _f(x, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _answers(answers: dict) -> list[str]:
    if not answers:
        return []
    width = max(len(label) for label in answers)
    lines = ["known answers (labelled probe tokens): the best cluster's F1, a supervised linear readout's AUC and F1, "
                 "top separating component"]
    for label, a in answers.items():
        top = a.get("top_component") or "–"
        named = [str(n).replace("_", " ").removesuffix("s") for n in a.get("top_component_named") or []]
        if named:
            top += f" ({', '.join(named)})"
        lines.append(f"  {label:<{width}}  {a.get('n_tokens', '–'):>5} tokens  F1 {_f(a.get('f1'))} (ceiling "
                     f"{_f(a.get('ceiling'))}, chance {_f(a.get('shuffled_f1'))})  readout AUC "
                     f"{_f(a.get('readout_auc'))}{_half(a)} F1 {_f(a.get('readout_f1'))}{_loss(a)}  {top}")
    return lines


def _half(a: dict) -> str:
    half = a.get("readout_auc_half")
    return f" (half the draws {_f(half)})" if half is not None else ""


def _loss(a: dict) -> str:
    if a.get("loss_auc") is None:
        return ""
    return f" (token loss alone: AUC {_f(a.get('loss_auc'))} F1 {_f(a.get('loss_f1'))})"


def _largest(values: dict, key: str) -> Optional[tuple[float, str]]:
    found = [(v[key], c) for c, v in values.items() if isinstance(v, dict) and v.get(key) is not None]
    return max(found) if found else None


def _figures(summary: dict) -> list[str]:
    clusters, sus = summary.get("clusters") or {}, summary.get("susceptibilities") or {}
    parts = []
    rel = clusters.get("reliability") or sus.get("reliability")
    if rel:
        parts.append(f"feature reliability median {_f(rel.get('features_median'))}, min "
                     f"{_f(rel.get('features_min'))} ({rel.get('least_reliable', '–')})")
    stab = clusters.get("stability") or {}
    if stab.get("ari") is not None:
        parts.append(f"cluster stability ARI {_f(stab['ari'])}")
    if sus.get("rhat_max") is not None:
        parts.append(f"R-hat max {_f(sus['rhat_max'], 3)}")
    lines = ["figures: " + "; ".join(parts)] if parts else []
    sc = clusters.get("scales")
    if sc and sc.get("halves_ari") is not None:        # structure at several scales (spectro.clusters.scales)
        lines.append(f"scales: {'finest stable' if sc['stable'] else 'none stable, the most stable'} is "
                     f"resolution {sc['resolution']:g} ({sc['n_clusters']} clusters, halves ARI "
                     f"{_f(sc['halves_ari'])}) of {', '.join(f'{r:g}' for r in sc['resolutions'])}")
    locality = sus.get("locality") or {}
    phi, disp = _largest(locality, "mean_phi"), _largest(locality, "displacement")
    if phi or disp:
        bits = ([f"E[phi] max {_f(phi[0])} nats ({phi[1]})"] if phi else []) + \
               ([f"displacement max {_f(disp[0])} ({disp[1]})"] if disp else [])
        far = sus.get("not_local") or []
        where = (", ".join(far) if len(far) <= 4 else f"{len(far)} of {len(locality)} components") if far else "none"
        lines.append(f"locality: {', '.join(bits)}; not local: {where}")
    r = summary.get("rounds")
    if r:                                          # sampled until reliable (spectro.rounds)
        lines.append(f"rounds: {r.get('n_rounds', '–')} ({r.get('draws', '–')} draws), stopped: "
                     f"{r.get('stopped_because', '–')}")
    return lines


def summary_lines(summary: dict, summary_path: Optional[str] = None, log_path: Optional[str] = None) -> list[str]:
    """The short summary: known answers, the figures behind the verdict, the verdict with its reasons, then where
    the report, the full summary and the log are. The verdict comes near the end, where a terminal keeps it."""
    lines = [""]
    lines += _answers((summary.get("clusters") or {}).get("known_answers") or {})
    lines += _figures(summary)
    v = summary.get("verdict")
    if v:
        lines.append(f"verdict: {v.get('text', '–')}")
        lines += [f"  - {r}" for r in v.get("reasons") or []]
    else:
        lines.append("verdict: none yet (the clusters stage gives it; stage=all runs every stage)")
    report = (summary.get("report") or {}).get("path")
    if report and summary_path:          # the run directory's own report: a copied or moved run keeps its files
        report = str(Path(summary_path).parent / Path(report).name)
    if report:
        lines.append(f"report:  {report}")
    if summary_path:
        lines.append(f"summary: {summary_path} (every figure; console.summary=full prints it here)")
    if log_path:
        lines.append(f"log:     {log_path}")
    return lines
