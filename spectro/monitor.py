"""wandb monitoring of a sampling run, read from the store by the driver.

Per chain, as separate series named `<component>/chain<k>/<metric>` against a
`draw` step metric: `phi` (sampling loss - init loss), the running LLC
estimate nβ·(mean sampling_loss - init_loss) over the draws so far, and every
per-draw observable of `spectro.traces.TRACES` under its `wandb` name (the
SGLD step loss, gradient and noise norms, the distance from w*). At the end,
per-component summaries (LLC mean and spread over chains, divergences).

Non-obvious choices:
- The driver logs what the store holds (polled while actors sample), so the
  dashboard shows exactly the committed numbers; actors never talk to wandb.
- Modes come from config: `offline` (default in tests; no account; sync later
  with `wandb sync <run_dir>/wandb/offline-run-*`), `online`, `disabled`.
- The wandb run's files live in the run directory (`<run_dir>/wandb`).
- Sampling in rounds (spectro.rounds): one wandb run for every round; after
  each, `log_round` logs each component's feature reliability and R-hat at
  the round's draws against the same `draw` step.
- wandb runs quiet: without its version header and its end-of-run panel (sparklines and values of the first
  ten of hundreds of per-chain series, about 25 lines), which would bury the run's own summary on the terminal.
  Where the offline files are and how to sync them it still says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from spectro.config import WandbConfig
from spectro.store import SampleStore
from spectro.traces import TRACES


class Monitor:
    def __init__(self, config: WandbConfig, run_dir: Path, run_config: dict, nbeta: float, name: Optional[str] = None):
        self.enabled = config.mode != "disabled"
        self.nbeta = nbeta
        self.logged: Optional[np.ndarray] = None     # (components, chains) draws already logged
        self.run = None
        if not self.enabled:
            return
        import wandb

        self.wandb = wandb
        (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(mode=config.mode, project=config.project, entity=config.entity, group=config.group,
                              name=name or Path(run_dir).name, dir=str(run_dir), config=run_config,
                              reinit="finish_previous", settings=wandb.Settings(quiet=True))
        self.run.define_metric("draw")
        self.run.define_metric("*", step_metric="draw")

    def poll(self, store: SampleStore) -> None:
        if not self.enabled:
            return
        L = store.layout
        progress = store.progress()
        if self.logged is None:
            self.logged = np.zeros_like(progress)
        init = store.init_loss
        for ci, comp in enumerate(L.components):
            for k in range(L.n_chains):
                start, stop = int(self.logged[ci, k]), int(progress[ci, k])
                if stop <= start:
                    continue
                s = store.read("sampling_loss", (ci, k, slice(0, stop)))          # (stop,)
                tr = {t.wandb: store.read(t.name, (ci, k, slice(start, stop))) for t in TRACES}
                phi = s - init
                running = np.cumsum(phi) / np.arange(1, stop + 1)
                for j, d in enumerate(range(start, stop)):
                    row = {"draw": d}
                    prefix = f"{comp}/chain{k}"
                    if np.isfinite(phi[d]):
                        row[f"{prefix}/phi"] = float(phi[d])
                        row[f"{prefix}/llc"] = float(self.nbeta * running[d])
                    for n, v in tr.items():
                        if np.isfinite(v[j]):
                            row[f"{prefix}/{n}"] = float(v[j])
                    self.run.log(row)
                self.logged[ci, k] = stop

    def log_round(self, record: dict) -> None:
        """One round of `spectro.rounds`: per component its feature reliability and R-hat at the round's draws,
        as `<component>/round_reliability` and `<component>/round_rhat` (and the round's median and min
        reliability and largest R-hat)."""
        if not self.enabled:
            return
        row = {"draw": record["draws"], "round": record["round"]}
        for comp, f in record["components"].items():
            row.update({f"{comp}/round_{k}": v for k, v in f.items() if v is not None})
        row.update({f"rounds/{k}": record[k] for k in ("reliability_median", "reliability_min", "rhat_max")
                    if record.get(k) is not None})
        self.run.log(row)

    def summarise(self, store: SampleStore) -> dict:
        """Per-component summaries (LLC mean and spread over chains, divergences), over the draws committed."""
        L = store.layout
        s = store.read("sampling_loss")                      # (components, chains, draws)
        div = store.diverged_at()
        summary = {}
        for ci, comp in enumerate(L.components):
            ok = div[ci] < 0
            llc = self.nbeta * (np.nanmean(s[ci, ok], axis=1) - store.init_loss) if ok.any() else np.array([])
            summary[comp] = {"llc_mean": float(llc.mean()) if llc.size else float("nan"),
                             "llc_std": float(llc.std(ddof=1)) if llc.size > 1 else float("nan"),
                             "diverged_chains": int((~ok).sum())}
        return summary

    def finish(self, store: SampleStore) -> dict:
        """Per-component summaries (`summarise`), recorded in the wandb run, which ends; returns them (also when
        wandb is disabled)."""
        summary = self.summarise(store)
        if self.enabled:
            for comp, vals in summary.items():
                for key, v in vals.items():
                    self.run.summary[f"{comp}/{key}"] = v
            self.run.finish()
        return summary
