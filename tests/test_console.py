"""What a user sees: the main job under a pseudo-terminal prints a progress bar, a line per stage and a short
summary ending with the verdict and the paths, in about 30 lines, with the libraries' start-up and loader
chatter kept in spectro.log; without a terminal the progress comes as periodic plain lines. The terminal rules
and the short summary are also checked in process, on records and a summary of the run's shape."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from spectro import console
from spectro.config import ConsoleConfig
from spectro.errors import ConfigError
from tests.helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
COLUMNS, LINES = 120, 40
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]")
MAX_LINES = 30


def run_in_pty(args: list[str], timeout: float) -> tuple[int, str]:
    """Run a command with stdin, stdout and stderr on a pseudo-terminal of COLUMNS x LINES; (exit code, bytes
    it wrote, decoded)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    env = {**os.environ, "COLUMNS": str(COLUMNS), "LINES": str(LINES), "TERM": "xterm"}
    proc = subprocess.Popen(args, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                tail = b"".join(chunks).decode(errors="replace")[-3000:]
                raise AssertionError(f"no exit within {timeout} s; output so far:\n{tail}")
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None and not select.select([master], [], [], 0.2)[0]:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:                 # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", errors="replace")


def screen(raw: str) -> list[str]:
    """What the terminal finally shows: escape sequences dropped, each line as its last carriage-return redraw
    left it (the terminal turns "\\n" into "\\r\\n"), trailing blank lines dropped."""
    text = ANSI.sub("", raw).replace("\r\n", "\n")
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


# --------------------------------------------------------------------------- #
# in process: the rules and the summary
# --------------------------------------------------------------------------- #


def record(name: str, level: int, msg: str = "m", **extra) -> logging.LogRecord:
    r = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    r.__dict__.update(extra)
    return r


def test_the_terminal_keeps_spectro_and_third_party_warnings_only():
    f = console.TerminalFilter()
    assert f.filter(record("spectro", logging.INFO))
    assert f.filter(record("spectro.clusters", logging.INFO))
    assert not f.filter(record("spectro.progress", logging.INFO, console=False))     # FILE_ONLY
    assert not f.filter(record("faiss.loader", logging.INFO, "Loading faiss with AVX512 support."))
    assert not f.filter(record("ray._private.worker", logging.INFO, "Started a local Ray instance."))
    assert not f.filter(record("ray.data._internal.execution.streaming_executor", logging.INFO))
    assert f.filter(record("ray.data", logging.WARNING))
    assert f.filter(record("py.warnings", logging.WARNING))
    assert not f.filter(record("ray._private.authentication.authentication_token_setup", logging.WARNING))
    assert not f.filter(record("ray.data._internal.progress", logging.WARNING, "Progress bars disabled."))
    fmt = console.TerminalFormatter()
    assert fmt.format(record("spectro", logging.INFO, "clusters: 3")) == "clusters: 3"
    assert fmt.format(record("spectro", logging.WARNING, "not mixed")) == "warning: not mixed"
    assert fmt.format(record("ray.data", logging.ERROR, "boom")) == "error (ray.data): boom"


def test_third_party_terminal_handlers_are_routed_to_the_root_logger():
    """A library logger that writes to the terminal itself and stops propagation (as Ray's and Ray Data's do)
    passes its records on to the root logger (spectro.log and the filtered terminal) after setup."""
    lib = logging.getLogger("spectro_test_library.sub")
    own = logging.StreamHandler(sys.stderr)
    lib.addHandler(own)
    lib.propagate = False
    lib.setLevel(logging.DEBUG)
    saved = console._mode
    try:
        console._mode = None
        console.route_third_party()                      # before setup: nothing changes
        assert own in lib.handlers and not lib.propagate
        console._mode = "plain"
        console.route_third_party()
        assert own not in lib.handlers and lib.propagate and lib.level == logging.INFO
    finally:
        console._mode = saved
        lib.handlers.clear()
        lib.propagate = True


def test_progress_lines_and_modes():
    assert console.progress_text(0, 120, 0.0, float("inf")) == "sampling 0/120 chain-draws, warming up"
    assert console.progress_text(60, 120, 0.96, 62.4) == "sampling 60/120 chain-draws (50%), 0.96 draws/s, ETA 62s"
    assert console.resolve("bar") == "bar" and console.resolve("plain") == "plain"

    class Pipe:
        def isatty(self):
            return False

    assert console.resolve("auto", Pipe()) == "plain"
    assert isinstance(console.progress_view("plain"), console.PlainProgress)
    assert isinstance(console.progress_view("bar"), console.BarProgress)


@pytest.mark.parametrize("key, value", [("console.progress", "fancy"), ("console.summary", "long")])
def test_console_settings_are_checked(key, value):
    from spectro.config import to_config
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_config(compose_cfg([f"{key}={value}"]))
    assert ConsoleConfig().progress == "auto" and ConsoleConfig().summary == "short"


SUMMARY = {
    "run_dir": "/runs/x",
    "susceptibilities": {"rhat_max": 1.234, "not_local": ["full"],
                         "locality": {"full": {"mean_phi": 0.61, "displacement": 0.2},
                                      "l0h1": {"mean_phi": 0.05, "displacement": 0.31}}},
    "clusters": {"reliability": {"features_median": 0.91, "features_min": 0.85, "least_reliable": "l2h2"},
                 "stability": {"ari": 0.66},
                 "scales": {"stable": False, "resolution": 1.0, "n_clusters": 9, "halves_ari": 0.3,
                            "resolutions": [1.0, 2.0, 4.0, 8.0]},
                 "known_answers": {"induction": {"f1": 0.5, "ceiling": 0.9, "shuffled_f1": 0.1, "readout_auc": 0.8,
                                                 "readout_f1": 0.42, "readout_auc_half": 0.78, "loss_auc": 0.7,
                                                 "loss_f1": 0.3, "top_component": "l1h2", "top_component_named": ["induction_heads"],
                                                 "n_tokens": 100}}},
    "verdict": {"ok": True, "text": "clusters reproducible", "reasons": ["feature reliability 0.91 >= 0.8"]},
    "report": {"path": "/runs/x/report.html"},
}


def test_the_short_summary_ends_with_the_verdict_and_the_paths():
    lines = console.summary_lines(SUMMARY, "/runs/x/summary.json", "/runs/x/spectro.log")
    text = "\n".join(lines)
    assert ("  induction    100 tokens  F1 0.50 (ceiling 0.90, chance 0.10)  readout AUC 0.80 (half the draws 0.78) F1 0.42 "
            "(token loss alone: AUC 0.70 F1 0.30)  l1h2 (induction head)") in text
    assert "feature reliability median 0.91, min 0.85 (l2h2); cluster stability ARI 0.66; R-hat max 1.234" in text
    assert "E[phi] max 0.61 nats (full), displacement max 0.31 (l0h1); not local: full" in text
    assert "scales: none stable, the most stable is resolution 1 (9 clusters, halves ARI 0.30) of 1, 2, 4, 8" in text
    verdict = lines.index("verdict: clusters reproducible")
    assert lines[verdict + 1] == "  - feature reliability 0.91 >= 0.8"
    assert lines[-3:] == ["report:  /runs/x/report.html",
                          "summary: /runs/x/summary.json (every figure; console.summary=full prints it here)",
                          "log:     /runs/x/spectro.log"]
    copied = console.summary_lines(SUMMARY, "/elsewhere/y/summary.json")         # a copied run names its own report
    assert copied[-2:] == ["report:  /elsewhere/y/report.html",
                           "summary: /elsewhere/y/summary.json (every figure; console.summary=full prints it here)"]
    only_sampled = console.summary_lines({"run_dir": "/runs/x", "sample": {}}, "/runs/x/summary.json")
    assert any(line.startswith("verdict: none yet") for line in only_sampled)


# --------------------------------------------------------------------------- #
# the main job, as a user sees it
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_the_main_job_on_a_terminal(tmp_path):
    run_dir = tmp_path / "run"
    code, raw = run_in_pty([sys.executable, str(ROOT / "jobs" / "run.py"), "experiment=smoke",
                            f"hydra.run.dir={run_dir}"], timeout=1200)
    lines = screen(raw)
    shown = "\n".join(lines)
    assert code == 0, shown[-4000:]
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{shown}"
    summary = json.loads((run_dir / "summary.json").read_text())
    verdict = f"verdict: {summary['verdict']['text']}"
    assert any(line.startswith(verdict) for line in lines[-10:]), shown
    assert str(run_dir / "report.html") in shown and str(run_dir / "summary.json") in shown
    bar = [line for line in lines if re.match(r"sampling +\d+%\|", line)]
    assert len(bar) == 1 and "100%" in bar[0] and "draws/s" in bar[0], shown    # one bar, left at its end
    assert lines[0] == f"run directory {run_dir} (spectro.log there keeps the full log)", shown
    for stage in ("sampling: ", "susceptibilities: ", "clusters: ", "sae: ", "report written to "):
        assert sum(line.startswith(stage) for line in lines) == 1, (stage, shown)
    for chatter in ("faiss", "Started a local Ray instance", "Token authentication", "Dataset", "ray.data", "INFO",
                    "{"):
        assert chatter not in shown, (chatter, shown)
    log = (run_dir / "spectro.log").read_text()
    assert re.search(r"\[spectro\.progress\]\[INFO\] - sampling \d+/\d+ chain-draws", log)
    assert "sampling 120/120 chain-draws (100%)" in log
    for kept in ("[faiss.loader][INFO]", "Started a local Ray instance", "Token authentication",
                 "Starting execution of Dataset", "verdict: "):
        assert kept in log, kept


def test_bad_input_on_a_terminal_is_one_line(tmp_path):
    """An input error found after the model is loaded (an unknown component) is still the one line the terminal
    shows, and leaves no run directory."""
    run_dir = tmp_path / "run"
    code, raw = run_in_pty([sys.executable, str(ROOT / "jobs" / "run.py"), "experiment=smoke", "components=[l9h9]",
                            f"hydra.run.dir={run_dir}"], timeout=600)
    lines = screen(raw)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("spectro: error: ") and "l9h9" in lines[0], lines
    assert not run_dir.exists()


@pytest.mark.slow
def test_the_main_job_without_a_terminal(tmp_path):
    """Through a pipe (CI, `ray job submit` logs) progress comes as plain log lines, nothing is redrawn, and the
    short summary still ends the output."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "run.py"), "experiment=smoke",
                           "components=[l0h1,l3h3]", "sae.enabled=false", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "\r" not in out and "\x1b" not in out
    progress = re.findall(r"\[spectro\.progress\]\[INFO\] - sampling (\d+)/(\d+) chain-draws", proc.stdout)
    assert len(progress) >= 2 and progress[0][0] == "0" and progress[-1][0] == progress[-1][1], proc.stdout
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1] == f"log:     {run_dir / 'spectro.log'}"
    assert any(line.startswith("verdict: ") for line in lines[-10:]), proc.stdout
    assert "faiss" not in out and "Started a local Ray instance" not in out
