"""Every command line shown in README.md and docs/*.md runs, as a user types it.

The commands are read from the Markdown: fenced code blocks (bash, sh, shell, console, or unlabelled ones that
hold a command), indented code blocks that hold one, and inline code spans that start with a program
(`python jobs/run.py ...`). Backslash continuations are joined, comments (`# ...` outside quotes) and blank
lines dropped, `&&` chains split. Each command is one test, named by file, line and command. A command that no
rule below covers fails its test, so a newly documented command cannot go untested: give it an execution rule
or an entry in NOT_EXECUTED.

Every command runs in a subprocess through bash, from the repository root, with PATH starting at this
interpreter's directory (`python`, `spectro` are this environment's), PYTHONPATH = this checkout (the code under
test, not an installed copy), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, WANDB_MODE=offline, HF_HUB_OFFLINE=1 and
HF_HUB_CACHE = a Hugging Face cache holding EleutherAI/pythia-14m at revision step143000 (the
Pythia-14M-shaped checkpoint of tests/pythia_fixture.py: the hub's layout and tokenizer, random weights; its
tests skip without the GPT-NeoX-20B tokenizer file, like every test that needs it). It must exit 0.

The main job (`python jobs/run.py`, `spectro`, `python -m spectro`; under `ray job submit ... --` the entrypoint
after `--`, run here without a cluster: tests/test_ray_jobs.py submits the main job to a real one):

- `experiment=smoke`: the whole pipeline, as typed (about a minute on 2 cores). Its run directory is the real
  run that the commands below read (`runs/X`, `runs/real`, ...: SUBSTITUTIONS).
- `experiment=control`: the whole pipeline at the smoke preset's size (`smoke_size()`: the values of
  conf/experiment/smoke.yaml as overrides, appended; Hydra takes one experiment). This is `runs/control`.
- a stage that works on an existing run directory (`stage=susceptibilities|clusters|sae|report`, or
  `report.control=`): as typed, on copies of the real runs.
- anything else would sample at scale: `stage=plan plan.calibration_draws=0` is appended. The plan validates
  the config, loads model and data as a run does and computes the cost; it samples nothing and writes
  plan.json. A multirun (`-m`) plans every job of the sweep.
- a command that makes a run directory gets a fresh temporary one in place of its own `hydra.run.dir` /
  `hydra.sweep.dir` (or in addition, when it names none). Commands that differ only in that directory, or in
  the order of their overrides, run once (so do identical commands that read the real runs); each of their
  tests checks that one result.

Benchmarks (`python benchmarks/*.py`) and jobs/train_default_model.py: the command as typed with `--help`
appended (argparse converts every value before it and exits 0 at `--help`), and every `--option` the command
uses must be one the script's help lists. QUICK names the scripts also run for real at a small size (under
30 s each on an idle 2-core machine). `python benchmarks/compare_runs.py`, `python benchmarks/bench_transforms.py`,
`python benchmarks/bench_rhat_null.py` on a run and `python jobs/sweep_summary.py` run as typed on the real runs.

Python blocks (```python) run as scripts against the real run: `runs/...` is its directory, an
`s3://bucket/<prefix>/<store>.zarr` URL is that store uploaded to moto's S3 server (tests/conftest.py `s3`), and
a line `expression  # <tuple literal>` asserts that the expression equals the literal.

Placeholders are replaced by SUBSTITUTIONS (word by word, before anything else); NOT_EXECUTED lists what is not
run here and why. A rule that no documented command uses any more fails `test_every_rule_is_used`.

Cost: about 30 minutes on a busy 2-core machine, most of it the two real runs and some twenty plans (each loads
the model and tokenizes the corpus as a run does, 20-60 s; the Pythia-shaped ones up to 3 minutes).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]

# --------------------------------------------------------------------------- #
# the rule tables
# --------------------------------------------------------------------------- #

# placeholder -> (what it becomes, why). Values in <> are made by the module's fixtures (World below).
SUBSTITUTIONS = {
    "/path/to/checkpoint": ("<pythia>", "a GPT-NeoX checkpoint directory in hub layout: the Pythia-14M-shaped one"),
    "SNAPSHOT": ("<pythia>", "a Pythia-14M snapshot directory: the Pythia-14M-shaped one"),
    "/path/to/saelens_dir": ("<sae>", "an SAE in SAELens layout: the one the real run trained (its sae/)"),
    "/path/to/gpt-neox-20b/tokenizer.json": ("<tokenizer>", "the GPT-NeoX-20B tokenizer file"),
    "/path/to/gpt-neox-20b.json": ("<tokenizer>", "the GPT-NeoX-20B tokenizer file"),
    "notes.txt": ("<corpus>/notes.txt", "a text file: standard-library source"),
    "texts/": ("<corpus>/texts/", "a directory of .txt files: standard-library source"),
    "/data/corpus.jsonl": ("<corpus>/corpus.jsonl", "a JSON Lines corpus with a text field"),
    "/path/to/probes.jsonl": ("<corpus>/probes.jsonl", "labelled probe contexts: standard-library source with "
                                                       "labelled tokens"),
    "runs/X": ("<real>", "a finished run: the smoke run"),
    "runs/real": ("<real>", "a finished run: the smoke run"),
    "runs/seed0": ("<real>", "a finished run: the smoke run"),
    "runs/seed1": ("<control>", "a second finished run on the same probe tokens: the control run"),
    "runs/control": ("<control>", "the nβ = 0 control: the control run"),
    "runs/until0": ("<real>", "a finished run sampled until reliable: the smoke run"),
    "runs/until1": ("<control>", "a second such run on the same probe tokens: the control run"),
    "RUN_DIR": ("<real>", "a finished run: the smoke run"),
    "multirun/<date>/<time>": ("<multirun>", "a sweep directory: jobs 0 and 1 are the smoke and the control run "
                                             "(tests/test_sweep.py runs a real multirun through the summary)"),
    "runs/sweep": ("<multirun>", "the sampler sweep's directory of runs: the sweep directory above"),
    "[overrides]": ("", "any overrides: none"),
    "...": ("", "more of the same: nothing"),
}
# a bracketed optional argument, `[--tokenizer PATH]`, is given
OPTIONAL_ARGUMENT = re.compile(r"\[(--[^\]]+)\]")

# command (full match) -> why it is not executed here, and what covers it
NOT_EXECUTED = {
    r"python3 -m venv \.venv": "creates the virtual environment: .ci/run runs README's install line as typed, "
                               "from a clean clone",
    r"\. \.venv/bin/activate": "activates that environment (shell state): .ci/run",
    r"pip install .*": "installs torch and the package: .ci/run",
    r"python -m pytest( .*)?": "the test suite, this file included: .ci/run runs `python -m pytest -q`",
    r"apt-get install -y chromium": "a Debian package for the report's browser test; .ci/run installs it "
                                    "where it can",
    r"export RAY_AUTH_MODE=token": "sets up the `ray start` below: tests/test_ray_jobs.py starts a head with "
                                   "token authentication",
    r"ray get-auth-token --generate": "sets up the `ray start` below: tests/test_ray_jobs.py",
    r"ray start --head( .*)?": "starts a Ray head on this machine: tests/test_ray_jobs.py starts one on loopback "
                               "with token authentication and submits the main job to it; the entrypoints "
                               "submitted in the docs run here",
    r"ray job submit( --working-dir \.| --runtime-env-json .*)?": "names the command in prose (the full "
                                                                  "`ray job submit ... -- <entrypoint>` lines "
                                                                  "are executed)",
    r"cd other": "how to run a benchmark from another checkout (`python benchmarks/...` stands for any of them)",
    r"PYTHONPATH=\$PWD python benchmarks/\.\.\.": "how to run a benchmark from another checkout "
                                                  "(`python benchmarks/...` stands for any of them)",
}

# benchmark script -> arguments of a real run at a small size (see the module docstring)
QUICK = {
    "benchmarks/bench_clusters.py": "--sizes 2000 --tune-seeds 0 --held-out --methods conductance",
    "benchmarks/bench_scale.py": "--tokens 3000 --components 4",
}

MAIN_JOB = ("python jobs/run.py", "python -m spectro", "spectro")
READING_STAGES = ("susceptibilities", "clusters", "sae", "report")
SMOKE_COMMAND = "python jobs/run.py experiment=smoke"            # README: the real run the readers use
CONTROL_COMMAND = "python jobs/run.py experiment=control hydra.run.dir=runs/control"
RAY_SUBMIT = re.compile(r"^ray job submit\b.*? -- (.+)$")
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
PYTHIA_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TIMEOUT = 1200

# --------------------------------------------------------------------------- #
# reading the commands from the Markdown
# --------------------------------------------------------------------------- #

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
PROGRAMS = {"python", "python3", "spectro", "ray", "pip", "pip3", "export", ".", "source", "apt-get", "apt",
            "wandb", "cd", "uv", "bash", "sh", "git", "docker", "make", "pytest", "conda", "curl", "aws"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


@dataclass(frozen=True)
class DocCommand:
    file: str
    line: int
    where: str          # "fenced", "indented" or "inline"
    text: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line} {self.text}"


@dataclass(frozen=True)
class PythonBlock:
    file: str
    line: int
    code: str


def program(command: str) -> str | None:
    """The command's first word after any VAR=value assignments."""
    for word in command.split():
        if not ENV_ASSIGNMENT.match(word):
            return word
    return None


def strip_comment(line: str) -> str:
    """`line` without a shell comment: `#` at the start or after whitespace, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def split_and(command: str) -> list[str]:
    """The commands of an `a && b && c` chain (`&&` outside quotes)."""
    parts, quote, start, i = [], None, 0, 0
    while i < len(command):
        ch = command[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif command.startswith(" && ", i):
            parts.append(command[start:i])
            start = i = i + 4
            continue
        i += 1
    parts.append(command[start:])
    return [p.strip() for p in parts if p.strip()]


def block_commands(numbered: list[tuple[int, str]], prompts: bool = False) -> list[tuple[int, str]]:
    """(line, command) of a code block: continuations joined, comments and blank lines dropped; with `prompts`
    only the `$ ` lines (a console block's output lines are not commands)."""
    if prompts:
        numbered = [(n, t.lstrip()[2:]) for n, t in numbered if t.lstrip().startswith("$ ")]
    out, pending, first = [], "", None
    for n, text in numbered:
        first = n if first is None else first
        text = text.rstrip()
        if text.endswith("\\"):
            pending += text[:-1].strip() + " "
            continue
        command = " ".join(strip_comment(pending + text.strip()).split())
        out += [(first, part) for part in split_and(command)]
        pending, first = "", None
    return out


def is_shell(body: list[tuple[int, str]]) -> bool:
    return any(program(t) in PROGRAMS for _, t in body)


def read_doc(rel: str) -> tuple[list[DocCommand], list[PythonBlock]]:
    lines = (ROOT / rel).read_text(encoding="utf-8").splitlines()
    commands: list[DocCommand] = []
    python: list[PythonBlock] = []
    prose = list(lines)                     # outside code blocks, for the inline spans
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*(```|~~~)\s*([\w+-]*)", lines[i])
        if fence:
            marker, lang = fence.group(1), fence.group(2).lower()
            start, body = i + 1, []
            prose[i] = ""
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(marker):
                body.append((i + 1, lines[i]))
                prose[i] = ""
                i += 1
            if i < len(lines):
                prose[i] = ""
            i += 1
            if lang in ("python", "py"):
                python.append(PythonBlock(rel, start + 1, "\n".join(t for _, t in body)))
            elif lang in SHELL_LANGS or (not lang and is_shell(body)):
                prompts = lang == "console" and any(t.lstrip().startswith("$ ") for _, t in body)
                commands += [DocCommand(rel, n, "fenced", c) for n, c in block_commands(body, prompts)]
            continue
        if lines[i].startswith(("    ", "\t")) and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            body = []
            while i < len(lines) and (lines[i].startswith(("    ", "\t")) or not lines[i].strip()):
                if lines[i].strip():
                    body.append((i + 1, lines[i]))
                i += 1
            if is_shell(body):
                for n, _ in body:
                    prose[n - 1] = ""
                commands += [DocCommand(rel, n, "indented", c) for n, c in block_commands(body)]
            continue
        i += 1
    text = "\n".join(prose)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        span = " ".join(m.group(1).split())
        if len(span.split()) >= 2 and program(span) in PROGRAMS:
            line = text.count("\n", 0, m.start()) + 1
            commands += [DocCommand(rel, line, "inline", part) for part in split_and(span)]
    return commands, python


def documented() -> tuple[list[DocCommand], list[PythonBlock]]:
    commands, python = [], []
    for rel in DOC_FILES:
        c, p = read_doc(rel)
        commands += c
        python += p
    return commands, python


COMMANDS, PYTHON_BLOCKS = documented()

# --------------------------------------------------------------------------- #
# what runs
# --------------------------------------------------------------------------- #


def not_executed(command: str) -> str | None:
    for pattern, reason in NOT_EXECUTED.items():
        if re.fullmatch(pattern, command):
            return reason
    return None


def substitute(command: str) -> str:
    """Placeholders replaced (values in <> are resolved by World.resolve)."""
    command = OPTIONAL_ARGUMENT.sub(r"\1", command)
    words = []
    for word in shlex.split(command):
        for placeholder, (value, _) in SUBSTITUTIONS.items():
            if placeholder in word:
                word = word.replace(placeholder, value)
        if word:
            words.append(word)
    return shlex.join(words)


def main_job(command: str) -> tuple[str, list[str]] | None:
    """(entry point, overrides) when `command` runs the main job."""
    words = shlex.split(command)
    for entry in MAIN_JOB:
        n = len(entry.split())
        if words[:n] == entry.split():
            return entry, words[n:]
    return None


def script(command: str) -> str | None:
    words = shlex.split(command)
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if len(words) >= 2 and words[0] in ("python", "python3") and words[1].endswith(".py"):
        return words[1]
    return None


@dataclass
class Plan:
    """How a documented command is executed."""
    kind: str                    # "smoke", "control", "reader", "plan", "help", "script", "skip"
    command: str = ""            # the shell command (placeholders still in <>)
    reason: str = ""


def plan_for(text: str) -> Plan | None:
    reason = not_executed(text)
    if reason:
        return Plan("skip", reason=reason)
    submitted = RAY_SUBMIT.match(text)
    if submitted:
        text = submitted.group(1)
    job = main_job(text)
    if job:
        entry, overrides = job
        keys = dict(o.split("=", 1) for o in overrides if "=" in o)
        if keys.get("stage") in READING_STAGES or "report.control" in keys:
            return Plan("reader", substitute(text))
        # a command that makes a run directory: its own directory is replaced by a temporary one (World.run)
        made = shlex.join([*entry.split(), *(o for o in overrides
                                             if not o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")))])
        made = substitute(made)
        if keys.get("experiment") == "smoke" and "-m" not in overrides:
            return Plan("smoke", made)
        if keys.get("experiment") == "control" and "-m" not in overrides:
            return Plan("control", shlex.join([*shlex.split(made), *smoke_size()]))
        extra = [] if keys.get("stage") == "plan" else ["stage=plan"]
        extra += [] if "plan.calibration_draws" in keys else ["plan.calibration_draws=0"]
        return Plan("plan", shlex.join([*shlex.split(made), *extra]))
    name = script(text)
    reads_a_run = name == "benchmarks/bench_rhat_null.py" and "--rho" not in text   # --rho: no run, a simulation
    if name in ("benchmarks/compare_runs.py", "benchmarks/bench_transforms.py", "jobs/sweep_summary.py") or reads_a_run:
        return Plan("script", substitute(text))
    if name and (name.startswith("benchmarks/") or name in ("jobs/train_default_model.py",
                                                            "jobs/build_corpus_asset.py")):
        return Plan("help", substitute(text))
    return None


def smoke_size() -> list[str]:
    """The smoke preset's values as command-line overrides (conf/experiment/smoke.yaml)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / "smoke.yaml"))

    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            elif isinstance(value, list):
                yield f"{prefix}{key}=[{','.join(map(str, value))}]"
            else:
                yield f"{prefix}{key}={value}"

    return list(flat(values))


def dedupe_key(command: str) -> tuple:
    words = shlex.split(command)
    job = main_job(command)
    if job:
        return (job[0], *sorted(job[1]))
    return tuple(words)


# --------------------------------------------------------------------------- #
# the module's runs and files
# --------------------------------------------------------------------------- #


@dataclass
class Result:
    command: str
    returncode: int
    output: str
    seconds: float
    run_dir: Path | None

    def check(self) -> None:
        assert self.returncode == 0, (f"`{self.command}` exited with {self.returncode} after {self.seconds:.0f} s:\n"
                                      f"{self.output[-4000:]}")


class World:
    """Runs each distinct command once and makes the real runs and files the placeholders stand for."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.results: dict[tuple, Result] = {}
        self.made: dict[str, Path] = {}
        self.copies = 0
        self.hub = tmp / "hub"
        self.hub.mkdir()

    # -- running --------------------------------------------------------------

    def env(self) -> dict:
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, **ENV, "PATH": path, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(self.hub)}

    def shell(self, command: str, run_dir: Path | None = None) -> Result:
        start = time.monotonic()
        proc = subprocess.run(command, shell=True, executable="/bin/bash", cwd=ROOT, env=self.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
        return Result(command, proc.returncode, proc.stdout, time.monotonic() - start, run_dir)

    def run(self, plan: Plan) -> Result:
        """A command that makes a run directory, in a fresh one; once per distinct command."""
        command = self.resolve(plan.command)
        key = dedupe_key(command)
        if key not in self.results:
            n = len(self.results)
            job = main_job(command)
            if job and "-m" in job[1]:
                run_dir = self.tmp / f"sweep{n}"
                command += f" hydra.sweep.dir={run_dir}"
            elif job:
                run_dir = self.tmp / f"run{n}"
                command += f" hydra.run.dir={run_dir}"
            else:
                run_dir = None
            self.results[key] = self.shell(command, run_dir)
        return self.results[key]

    def once(self, command: str) -> Result:
        """A command that reads the real runs (on copies of them); once per distinct command."""
        key = ("once", *shlex.split(command))
        if key not in self.results:
            self.results[key] = self.shell(self.resolve(command))
        return self.results[key]

    def resolve(self, command: str) -> str:
        """<name> placeholders made real: runs and copies of them, the checkpoint, the corpus files; the hub
        cache filled for a command that names the hub's Pythia-14M (model=pythia-14m, experiment=pythia14m)."""
        if re.search(r"\bmodel=pythia-14m\b|\bexperiment=pythia14m\b", command):
            self.thing("pythia")

        def value(m: re.Match) -> str:
            name = m.group(1)
            if name in ("real", "control"):
                return str(self.copy(self.finished(name)))
            return str(self.thing(name))
        return re.sub(r"<(real|control|pythia|sae|tokenizer|corpus|multirun)>", value, command)

    # -- what the placeholders stand for -------------------------------------

    def finished(self, name: str) -> Path:
        """The real run `name` ("real": README's smoke command; "control": the control at the smoke size)."""
        if name not in self.made:
            plan = plan_for(SMOKE_COMMAND if name == "real" else CONTROL_COMMAND)
            result = self.run(plan)
            if result.returncode != 0:
                pytest.fail(f"the {name} run failed, which this command reads:\n"
                            f"`{result.command}` exited with {result.returncode}:\n{result.output[-3000:]}")
            self.made[name] = result.run_dir
        return self.made[name]

    def copy(self, run: Path) -> Path:
        self.copies += 1
        target = self.tmp / f"copy{self.copies}-{run.name}"
        shutil.copytree(run, target)
        return target

    def thing(self, name: str) -> Path:
        if name in self.made:
            return self.made[name]
        if name == "pythia":
            from tests.pythia_fixture import make_pythia14m_checkpoint

            storage = self.hub / "models--EleutherAI--pythia-14m"
            path = make_pythia14m_checkpoint(storage / "snapshots" / PYTHIA_COMMIT)
            (storage / "refs").mkdir()
            (storage / "refs" / "step143000").write_text(PYTHIA_COMMIT)
        elif name == "tokenizer":
            from tests.pythia_fixture import SHARED_TOKENIZER

            if not SHARED_TOKENIZER.is_file():
                pytest.skip(f"needs the GPT-NeoX-20B tokenizer file (not found: {SHARED_TOKENIZER})")
            path = SHARED_TOKENIZER
        elif name == "sae":
            path = self.finished("real") / "sae"
        elif name == "corpus":
            path = self.tmp / "corpus"
            write_corpus(path)
        elif name == "multirun":
            path = self.tmp / "multirun"
            path.mkdir()
            shutil.copytree(self.finished("real"), path / "0")
            shutil.copytree(self.finished("control"), path / "1")
        else:
            raise KeyError(name)
        self.made[name] = path
        return path


def write_corpus(directory: Path) -> None:
    """notes.txt, texts/*.txt and corpus.jsonl: standard-library source, each enough for the default data sizes
    (512 + 32 + 64 contexts of 64 tokens); probes.jsonl: four labelled probe contexts (data.probe.file)."""
    import json
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8")
             for name in ("argparse.py", "typing.py", "inspect.py", "subprocess.py", "dataclasses.py", "enum.py")]
    (directory / "texts").mkdir(parents=True)
    (directory / "notes.txt").write_text("\n".join(texts[:3]), encoding="utf-8")
    for i, text in enumerate(texts[3:]):
        (directory / "texts" / f"part{i}.txt").write_text(text + texts[i], encoding="utf-8")
    with open(directory / "corpus.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    with open(directory / "probes.jsonl", "w", encoding="utf-8") as f:
        for text in texts[:4]:
            f.write(json.dumps({"text": text[:4000], "tokens": [[5, "mine"], [9, "mine"], [20, "other"]]}) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("documented"))


# --------------------------------------------------------------------------- #
# the tests
# --------------------------------------------------------------------------- #


def test_the_docs_show_commands():
    """The reader finds the commands (a broken reader would leave nothing to test)."""
    texts = {c.text for c in COMMANDS}
    assert len(COMMANDS) > 50 and len(PYTHON_BLOCKS) >= 2
    assert {SMOKE_COMMAND, CONTROL_COMMAND, "python jobs/run.py"} <= texts
    assert any(c.where == "indented" for c in COMMANDS) and any(c.where == "inline" for c in COMMANDS)


def test_every_command_has_a_rule():
    """A newly documented command needs an execution rule or a NOT_EXECUTED entry with its reason."""
    missing = [c.id for c in COMMANDS if plan_for(c.text) is None]
    assert not missing, ("no rule runs these documented commands: add an execution rule or a NOT_EXECUTED entry "
                         "(with the reason) to tests/test_documented_commands.py:\n" + "\n".join(missing))


def test_every_rule_is_used():
    texts = [c.text for c in COMMANDS]
    for pattern in NOT_EXECUTED:
        assert any(re.fullmatch(pattern, t) for t in texts), f"NOT_EXECUTED rule {pattern!r} matches no command"
    for placeholder in SUBSTITUTIONS:
        assert any(placeholder in t for t in texts), f"placeholder {placeholder!r} is in no documented command"
    for name in QUICK:
        assert any(script(t) == name for t in texts if not not_executed(t)), f"QUICK: {name} is not documented"


@pytest.mark.slow
@pytest.mark.parametrize("doc", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_runs(doc, world):
    plan = plan_for(doc.text)
    if plan is None:
        pytest.fail(f"{doc.file}:{doc.line}: no rule runs `{doc.text}`: add an execution rule or a NOT_EXECUTED "
                    "entry (with the reason) to tests/test_documented_commands.py")
    if plan.kind == "skip":
        pytest.skip(f"not executed here: {plan.reason}")
    if plan.kind in ("smoke", "control", "plan"):
        result = world.run(plan)
        result.check()
        if plan.kind == "plan":
            multirun = "-m" in main_job(plan.command)[1]
            jobs = sorted(result.run_dir.glob("*/plan.json")) if multirun else [result.run_dir / "plan.json"]
            assert jobs and all(p.is_file() for p in jobs), result.output[-2000:]
        else:
            assert (result.run_dir / "report.html").is_file(), result.output[-2000:]
    elif plan.kind in ("reader", "script"):
        world.once(plan.command).check()
    elif plan.kind == "help":
        check_help(world, plan.command)
    else:
        raise AssertionError(plan.kind)


def check_help(world: World, command: str) -> None:
    """The command as typed with --help: every value it gives parses and every option it uses exists."""
    command = world.resolve(command)
    result = world.shell(f"{command} --help")
    result.check()
    used = {w.split("=", 1)[0] for w in shlex.split(command) if w.startswith("--")}
    listed = set(re.findall(r"--[\w-]+", result.output))
    assert used <= listed, f"`{command}` uses {sorted(used - listed)}, which its --help does not list"
    name = script(command)
    if name in QUICK:
        quick = world.run(Plan("script", f"python {name} {QUICK[name]}"))
        quick.check()


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"{b.file}:{b.line}" for b in PYTHON_BLOCKS])
def test_documented_python_runs(block, world, request, tmp_path):
    real = world.finished("real")
    code = block.code.replace("runs/...", str(real))
    for url in sorted(set(re.findall(r"s3://bucket/[\w/.-]+?\.zarr", code))):
        upload(request, real, url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        code = re.sub(r"http://127\.0\.0\.1:\d+", endpoint, code)
    path = tmp_path / "snippet.py"
    path.write_text(with_claims(code), encoding="utf-8")
    result = world.shell(f"python {path}")           # each `expr  # <literal>` line became an assert
    assert result.returncode == 0, f"{block.file}:{block.line} failed:\n{result.output[-4000:]}"


def upload(request, run: Path, url: str) -> None:
    """The run's store named at the end of `url` (s3://bucket/<prefix>/<name>.zarr), uploaded there."""
    request.getfixturevalue("s3")
    import boto3
    import s3fs

    client = boto3.client("s3")
    if "bucket" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket="bucket")
    fs = s3fs.S3FileSystem()
    target = url.removeprefix("s3://")
    if not fs.exists(target):
        fs.put(str(run / Path(target).name), target, recursive=True)


def with_claims(code: str) -> str:
    """`expr  # (a, b)` lines become `assert (expr) == (a, b)`: the comment states the value."""
    out = []
    for line in code.splitlines():
        body, sep, comment = line.partition("  #")
        try:
            claim = ast.literal_eval(comment.strip()) if sep else None
        except (ValueError, SyntaxError):
            claim = None
        if isinstance(claim, (tuple, list)) and body.strip() and not body.startswith((" ", "\t")):
            out.append(f"assert ({body.strip()}) == {claim!r}, ({body.strip()!r}, {body.strip()})")
        else:
            out.append(line)
    return "\n".join(out) + "\n"
