"""What a sampler setting buys in reliability, per second: the calibration trials.

Runs the chains of a few components (and `full`) in this process, one torch
thread, for each requested setting and each seed, keeping every draw in
memory; then, per setting:

- R-hat (max over components, over antithetic pair means when paired) and
  bulk ESS (min), from arviz-stats as the pipeline computes them;
- the within-run reliability of the clustering features (split halves, each
  with its own half of `full`, Spearman-Brown; median over components), per
  seed, and the same with halves that share `full` (what a naive split shows);
- the agreement of the features between the two seeds (Pearson r per
  component, median): what the within-run figure should predict;
- the covariance form's cross-seed agreement and, for the peer form, the
  spread over tokens of its covariance part and of its mean-shift part
  (docs/method.md, "What dominates chi");
- sampling seconds per seed, in this process.

    python benchmarks/bench_reliability.py                                  # the default against the old default
    python benchmarks/bench_reliability.py --settings "step_size=1e-3,num_draws=20,steps_between_draws=1,antithetic=false" "step_size=3e-3"
    python benchmarks/bench_reliability.py --components full,l0h1,l2.mlp,unembed --seeds 0 1

Each setting is a comma-separated list of sampler overrides on top of the
default config. The figures in docs/calibration.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import parse_setting  # noqa: E402
from spectro.config import to_config  # noqa: E402
from spectro.estimator import ChainMoments, susceptibility, units_of  # noqa: E402
from spectro.features import feature_matrix  # noqa: E402
from spectro.pipeline import prepare  # noqa: E402
from spectro.reliability import column_correlations, spearman_brown  # noqa: E402
from spectro.sampling import UnitRunner  # noqa: E402

COMPONENTS = "full,l0h1,l1h2,l2h0,l3h3,l0.mlp,l2.mlp,embed,unembed"
OLD_DEFAULT = "step_size=1e-3,num_draws=20,steps_between_draws=1,antithetic=false"


def sample(prepared, config, components):
    """{component: (sampling (chains, draws), probe (chains, draws, tokens))}, seconds."""
    s = config.sampler
    out, t0 = {}, time.perf_counter()
    for name in components:
        comp = next(c for c in prepared.components if c.name == name)
        S = np.zeros((s.num_chains, s.num_draws))
        P = np.zeros((s.num_chains, s.num_draws, prepared.problem.n_probe_tokens), dtype=np.float32)
        for g0 in range(0, s.num_chains, s.chain_group):
            chains = list(range(g0, min(g0 + s.chain_group, s.num_chains)))
            runner = UnitRunner(prepared.problem, comp, chains, s, s.seed)
            state = runner.start()
            for d in range(s.num_draws):
                state, draw = runner.next_draw(state)
                S[chains, d], P[chains, d] = draw.sampling_loss, draw.probe_loss
        out[name] = (S, P)
    return out, time.perf_counter() - t0


def estimates(draws, init, form, paired):
    """chi (tokens, comps), chi_half (2, tokens, comps), halves sharing full, covariance/shift parts."""
    names = [c for c in draws if c != "full"]
    fs, fp = draws["full"]

    def moments(s, p):
        return [ChainMoments(p.shape[-1]).add(s[k], p[k], init) for k in range(s.shape[0])]

    full = moments(fs, fp)
    units = units_of(len(full), paired)
    chi, half, shared, cov_sd, shift_sd = [], [], [], [], []
    for c in names:
        comp = moments(*draws[c])
        est = susceptibility(comp, full, form, units, units)
        chi.append(est.chi)
        half.append(est.chi_half)
        k = len(units) // 2
        shared.append([susceptibility([comp[i] for u in us for i in u], full, form).chi
                       for us in (units[:k], units[k:])])
        cov = susceptibility(comp, full, "covariance", units, units).chi
        cov_sd.append(cov.std())
        shift_sd.append((est.chi - cov).std())
    return (names, np.stack(chi, 1), np.stack(half, 2), np.moveaxis(np.array(shared), 0, 2),
            np.array(cov_sd), np.array(shift_sd))


def mixing(draws, init, paired):
    from arviz_stats.base import array_stats

    rhat, ess = [], []
    for s, _ in draws.values():
        phi = s - init
        phi = np.stack([phi[u].mean(0) for u in units_of(phi.shape[0], paired)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rhat.append(float(array_stats.rhat(phi, chain_axis=0, draw_axis=1, method="rank")))
            ess.append(float(array_stats.ess(phi, chain_axis=0, draw_axis=1, method="bulk")))
    return max(rhat), min(ess)


def reliability(half):
    r = column_correlations(feature_matrix(half[0]), feature_matrix(half[1]))
    return float(np.median(spearman_brown(r)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=[OLD_DEFAULT, ""])
    ap.add_argument("--components", default=COMPONENTS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--against", default=None,
                    help="a reference setting (e.g. control=true): noise-corrected feature agreement of every "
                         "setting with it, and the role information of each")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    components = args.components.split(",")
    if "full" not in components:
        components = ["full"] + components
    results = {}
    settings = list(args.settings) + ([args.against] if args.against is not None else [])
    for setting in settings:
        runs = []
        for seed in args.seeds:
            config = to_config({"sampler": {**parse_setting(setting), "seed": seed}})
            prepared = prepare(config)
            draws, seconds = sample(prepared, config, components)
            paired = config.sampler.antithetic
            init = prepared.problem.init_loss
            peer = estimates(draws, init, "peer", paired)
            cov = estimates(draws, init, "covariance", paired)
            runs.append({"peer": peer, "cov": cov, "seconds": seconds, "mix": mixing(draws, init, paired)})
        names = runs[0]["peer"][0]
        results[setting] = runs
        print(f"setting [{setting or 'default'}]: " + ", ".join(f"{k}={v}" for k, v in
                                                             json.loads(json.dumps(vars(config.sampler))).items()
                                                             if k in ("step_size", "num_chains", "num_draws", "burnin",
                                                                      "steps_between_draws", "antithetic",
                                                                      "probe_dtype")))
        for seed, r in zip(args.seeds, runs):
            print(f"  seed {seed}: sampling {r['seconds']:.0f} s; R-hat max {r['mix'][0]:.3f}, ESS min "
                  f"{r['mix'][1]:.0f}; within-run feature reliability {reliability(r['peer'][2]):.3f} (halves "
                  f"sharing full: {reliability(r['peer'][3]):.3f}); covariance form {reliability(r['cov'][2]):.3f}")
        print(f"  role information: 25-nearest-neighbour role accuracy of the features (5-fold) "
              f"{role_accuracy(runs[0]['peer'][1], prepared):.3f} (majority class {majority(prepared):.3f})")
        if len(runs) >= 2:
            a, b = runs[0]["peer"][1], runs[1]["peer"][1]
            feat = column_correlations(feature_matrix(a), feature_matrix(b))
            raw = column_correlations(a, b)
            covx = column_correlations(feature_matrix(runs[0]["cov"][1]), feature_matrix(runs[1]["cov"][1]))
            print(f"  across seeds: features r median {np.median(feat):.3f} (min {feat.min():.3f}), raw median "
                  f"{np.median(raw):.3f}; covariance form features median {np.median(covx):.3f}")
            print("   per component: " + " ".join(f"{c}:{v:.2f}" for c, v in zip(names, feat)))
        print(f"  peer chi over tokens: sd of the covariance part / sd of the mean-shift part, median "
              f"{np.median(runs[0]['peer'][4] / runs[0]['peer'][5]):.4f}")
    if args.against is not None:
        ref = results[args.against][0]["peer"]
        ref_rel = spearman_brown(column_correlations(feature_matrix(ref[2][0]), feature_matrix(ref[2][1])))
        for setting in args.settings:
            run = results[setting][0]["peer"]
            rel = spearman_brown(column_correlations(feature_matrix(run[2][0]), feature_matrix(run[2][1])))
            r = column_correlations(feature_matrix(run[1]), feature_matrix(ref[1]))
            corrected = r / np.sqrt(np.clip(rel * ref_rel, 1e-12, None))
            print(f"[{setting or 'default'}] against [{args.against}]: features r median {np.median(r):.3f}, "
                  f"noise-corrected median {np.median(corrected):.3f} (min {corrected.min():.3f})")
    return 0


def _roles(prepared):
    from spectro.roles import token_roles

    return token_roles(prepared.probe.token_text, prepared.probe.token_source).astype(str)


def majority(prepared) -> float:
    _, counts = np.unique(_roles(prepared), return_counts=True)
    return float(counts.max() / counts.sum())


def role_accuracy(chi, prepared) -> float:
    """How much token-role information the features carry, whatever a clustering makes of it."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(25), feature_matrix(chi), _roles(prepared), cv=5).mean())


if __name__ == "__main__":
    sys.exit(main())
