"""The per-draw observables ("traces"): one registry that the sampler, the store, the monitor and the plan read.

Besides its sampling and probe losses, every draw of every chain records a few
scalars that describe the SGLD chain itself. Each is one `Trace` in `TRACES`:

- the sampler (`spectro.sampling.UnitRunner.next_draw`) computes a value per
  chain for every entry (`Draw.traces`, keyed by name) and refuses a draw
  record that lacks one or has an extra one;
- the store (`spectro.store`) makes one array per entry, [component, chain,
  draw] with the entry's dtype and fill value, writes it from shard 0's unit,
  checks its committed chunks on resume and reads it back;
- the monitor (`spectro.monitor`) logs it per chain as wandb series
  `<component>/chain<k>/<wandb>`;
- the plan (`spectro.plan.work.store_arrays`) counts its bytes.

Adding an observable is one entry here plus its computation in `next_draw`
(docs/architecture.md, "Adding a per-draw observable").
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Trace:
    name: str                  # the key in `Draw.traces` and the store's array name
    dtype: str                 # the stored dtype (numpy name)
    description: str           # what one value is, per chain and draw
    wandb: str                 # the monitor's series: `<component>/chain<k>/<wandb>`
    fill: float = math.nan     # the store's value for a draw not yet sampled


TRACES: tuple[Trace, ...] = (
    Trace("step_loss", "float64", "mean minibatch loss over the SGLD steps since the last draw", "step_loss"),
    Trace("grad_norm", "float64", "||nβ ∇L|| over the component's entries, last step", "grad_norm"),
    Trace("noise_norm", "float64", "norm of the injected noise over the component's entries, last step",
          "noise_norm"),
    Trace("distance", "float64", "||w - w*|| over the component's entries at the draw", "distance"),
)
TRACE_NAMES: tuple[str, ...] = tuple(t.name for t in TRACES)
