"""Every config in conf/ composes and validates; bad values get one clear
ConfigError naming the key."""

import pytest
from omegaconf import OmegaConf

from spectro.config import SpectroConfig, as_dict, to_config
from spectro.errors import ConfigError
from tests.helpers import CONF, compose_cfg


def group_options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "sampler", "clustering", "sae", "experiment"])
def test_every_group_option_composes_and_validates(group):
    for option in group_options(group):
        overrides = [f"{group}={option}"]
        if group == "model" and option == "local":
            overrides.append("model.source=/some/dir")
        if group == "data" and option == "files":
            overrides.append("data.corpus.paths=[a.txt]")
        composed = compose_cfg(overrides)
        cfg = to_config(composed)
        # validation keeps every composed value; only sampler.nbeta=null resolves to a number (checked below)
        want = dict(_leaves(OmegaConf.to_container(composed, resolve=True)))
        got = dict(_leaves(as_dict(cfg)))
        assert {k: got.get(k, "missing") for k in want if k != "sampler.nbeta"} == \
            {k: v for k, v in want.items() if k != "sampler.nbeta"}, f"{group}={option}"
        if group == "experiment" and option == "control":
            assert cfg.sampler.control and cfg.sampler.nbeta == 0       # the control: no loss term anywhere
        else:
            assert cfg.sampler.nbeta > 0 and not cfg.sampler.control


def test_default_config_resolves_nbeta():
    import math

    cfg = to_config(compose_cfg(["sampler.nbeta=null"]))
    assert cfg.sampler.nbeta == pytest.approx(cfg.sampler.batch_size / math.log(cfg.sampler.batch_size))
    assert to_config(compose_cfg()).model.source == "embedded"
    assert to_config(compose_cfg(["sampler.nbeta=30"])).sampler.nbeta == 30
    control = to_config(compose_cfg(["sampler.control=true"]))          # the default nβ, replaced by 0
    assert control.sampler.nbeta == 0.0 and control.sampler.control


@pytest.mark.parametrize("override, message", [
    ("sampler.step_size=-1e-4", r"sampler.step_size must be a positive finite number \(got -0.0001\)"),
    ("sampler.step_size=0", r"sampler.step_size must be a positive"),
    ("sampler.nbeta=-3", r"sampler.nbeta must be positive \(got -3.0\)"),
    ("sampler.gamma=-1", r"sampler.gamma must be >= 0"),
    ("sampler.num_chains=1", r"sampler.num_chains must be >= 2"),
    ("sampler.precondition=adam", r"sampler.precondition must be 'none' or 'rmsprop'"),
    ("data.seq_len=1", r"data.seq_len must be >= 2"),
    ("components=[l0h1,l0h1]", r"components lists \['l0h1'\] more than once"),
    ("estimator.form=other", r"estimator.form must be 'peer' or 'covariance'"),
    ("wandb.mode=sometimes", r"wandb.mode must be offline, online or disabled"),
    ("sampler.step_size=fast", r"sampler.step_size"),
])
def test_bad_values_raise_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        to_config(compose_cfg([override]))


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="bogus"):
        to_config({"sampler": {"bogus": 1}})


def test_the_main_job_is_the_schema_plus_the_embedded_data_suites():
    """`python jobs/run.py` composes the schema's defaults plus what the default groups set, and the only such
    setting is data=embedded's labelled probe suites (a run without Hydra, the library API, probes natural
    windows only)."""
    from spectro.config import PROBE_SUITES, as_dict

    composed = as_dict(to_config(compose_cfg()))
    plain = as_dict(to_config({}))
    assert plain["data"]["probe"]["suites"] == []
    assert composed["data"]["probe"]["suites"] == list(PROBE_SUITES)
    composed["data"]["probe"]["suites"] = []
    assert composed == plain


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a nested dict; dict-typed settings (data.corpus) count as one leaf."""
    for k, v in node.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and path != "data.corpus":
            yield from _leaves(v, path + ".")
        else:
            yield path, v


def test_every_schema_key_can_be_set_from_the_command_line():
    """Every key of the schema exists in the composed config, so `key=value` works on the command line (a key
    with a schema default but no YAML entry used to be refused by Hydra: sampler.probe_shards, sampler.control)."""
    from omegaconf import OmegaConf

    from spectro.config import as_dict

    defaults = dict(_leaves(as_dict(SpectroConfig())))
    composed = dict(_leaves(OmegaConf.to_container(compose_cfg(), resolve=False)))
    assert set(defaults) <= set(composed), sorted(set(defaults) - set(composed))
    cfg = to_config(compose_cfg(["sampler.probe_shards=4", "sampler.control=true", "sampler.antithetic=false",
                                 "store.probe=moments", "storage.uri=/tmp/x", "plan.gpu=h100"]))
    assert cfg.sampler.probe_shards == 4 and cfg.sampler.control and not cfg.sampler.antithetic
    assert cfg.store.probe == "moments" and cfg.plan.gpu == "h100"


def test_yaml_files_hold_only_overrides():
    """One source for every default: the schema (spectro/config.py). A YAML value equal to the schema's default
    (for an experiment preset: to the main job's composed value, which it overrides) is a second copy that can
    drift, and is refused here."""
    from omegaconf import OmegaConf

    from spectro.config import as_dict

    defaults = dict(_leaves(as_dict(SpectroConfig())))
    base = dict(_leaves(OmegaConf.to_container(compose_cfg(), resolve=False)))   # what an experiment starts from
    restated = []
    files = sorted(CONF.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        node.pop("defaults", None)
        node.pop("hydra", None)
        group = path.parent.relative_to(CONF).as_posix()
        is_global = group == "." or "@package _global_" in path.read_text()
        prefix = "" if is_global else group.replace("/", ".") + "."
        reference = base if group == "experiment" else defaults
        for key, value in _leaves(node, prefix):
            if key in reference and value == reference[key]:
                restated.append(f"{path.relative_to(CONF)}: {key}={value!r}")
    assert not restated, "values that restate the schema's default:\n" + "\n".join(restated)


def test_the_readme_lists_the_keys_a_resume_may_change():
    """README.md's resume paragraph names exactly the keys the run's fingerprint leaves out."""
    import re

    from spectro.config import RESUME_NEUTRAL_KEYS

    readme = (CONF.parent / "README.md").read_text(encoding="utf-8")
    found = re.search(r"These keys are left out\s+of that comparison and may change between attempts \(([^)]*)\)", readme)
    assert found, "README.md no longer has the sentence listing the keys a resume may change"
    named = re.findall(r"`([^`]+)`", found.group(1))
    assert sorted(named) == sorted(RESUME_NEUTRAL_KEYS), (named, RESUME_NEUTRAL_KEYS)
