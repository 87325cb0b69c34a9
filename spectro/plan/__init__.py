"""`stage=plan`: what a run will cost, computed before it runs.

`python jobs/run.py stage=plan [overrides]` loads the model and data exactly
as a run would (`pipeline.prepare`, which writes nothing), then prints a
table and writes `plan.json` into the run directory; it samples nothing and
creates no store, checkpoint or summary. The plan holds:

- work: units (component x chain group x probe shard, as
  `store.Layout.shard_units` forms them for the service), chain-draws, SGLD
  steps (burn-in + draws x steps_between_draws per unit: every probe shard
  of a chain group repeats them), chain evaluations (each of its shard's
  probe contexts);
- FLOPs of the SGLD steps, of the draw-time evaluations and of building the
  lower-layer caches (model below);
- the sample store's logical (uncompressed) bytes per array, as
  `SampleStore._create` lays it out, and the checkpoints' bytes, for the
  configured `store.probe` mode (`store`) and for both (`stores`: draws
  keeps every draw's probe losses, moments per-chain float64 sums);
- peak memory per actor (model below);
- predicted wall time of the sampling stage on this machine, from a few
  timed SGLD steps and evaluations of `full` and of one other component in
  this process (one actor's threads), and on a named GPU (`plan.gpu`);
- with a `sampler.until` target (spectro.rounds): the round size and the
  most rounds the draw budget allows; every figure above is for the whole
  budget, the most the rounds can cost. The draws a reliability target
  needs take chi's split-half reliability, which a few timed steps do not
  give: with `plan.pilot=true` the plan samples and estimates round 1 in a
  scratch directory (spectro.plan.pilot) and predicts them from it, as the
  run itself does after round 1 (rounds.json).

FLOP model (the one `benchmarks/bench_w2.py` uses; per token, GPT-NeoX with
hidden H, MLP width I, vocabulary V, context T, n layers):

    fwd(s)   = (n - s) * (2 * (4 H^2 + 2 H I) + 4 T H) + 2 H V     layers s.. and the head
    step     = g B T * (fwd(start) + act(layer) + 2 * dense_sampled)
    eval     = (n_sampling + n_probe) * T * fwd(start)              per chain and draw
    cache    = (n_train + n_sampling + n_probe) * T * (fwd(0) - fwd(start))   per unit

`start` is the component's layer when the lower-layer cache applies (layer
>= 1: all but `full`, `embed` and layer 0's heads and MLP), else 0; `act(layer)` = fwd(layer) is the
activation gradient from the head down to the component's layer (0 for
`unembed`); `dense_sampled` is the number of sampled entries whose gradient
is a matmul (the token embedding's is a scatter-add and counts nothing). For
`full` this is 6 x params x tokens up to the attention term. g = chains in
the unit, B = `sampler.batch_size`.

Time model on this machine: per unit, `setup + steps * t_step + draws * g *
t_eval`, with t_step = step FLOPs / r + u * g * S (S = entries of the sampled
tensors: the update, its noise and norms stream every entry, masked or not)
and t_eval = eval FLOPs / r_e + v, fitted to the two calibrated components
(each of which is then predicted exactly as measured); units are dealt to
`ray.num_actors` actors in the service's order (an idle actor takes the next
unit), plus the actors' start. The calibration also measures how many cores
other processes want meanwhile (O, from /proc/stat: their busy cores, or,
when the calibration got less than its threads, the demand fair sharing
implies): with the machine's c cores shared fairly, the calibration ran at
min(1, c / (threads + O)) of a core's speed and each actor of a local run
will run at min(1, c / (actors x threads + O)); unit times are stretched by
that ratio.
So the prediction is for the machine as loaded while planning.

GPU model: FLOPs / (datasheet dense rate x EFFICIENCY) + the SGLD update's
memory traffic / (bandwidth x BW_EFFICIENCY) + one launch latency (LAUNCH_S)
per eager op. The ops are counted in the calibration (every aten op torch
dispatches in one step and one evaluation of each calibrated component;
other units from a fit per layer run and per sampled tensor), or without a
calibration taken from per-layer constants. The dtype is that of the run:
SGLD steps float32 (TF32 with `sampler.tf32`), evaluations float32 or bf16
(`sampler.probe_dtype`). Nothing here has been checked against a GPU run
(docs/performance.md).

Peak memory per actor: runtime (Python, torch, Ray) + model (float32) + the
fixed data (int64 ids) + for the largest unit: chain states (g x S float32,
three copies during an update: weights, new weights, gradients; RMSProp adds
two), the lower-layer cache, the activations autograd saves in a step
(g B T tokens x layers above `start` x (11 H + 2 I + 2 heads T) float32 + the
head's (128 x V) block per chain) or of one evaluation chunk, whichever is
larger, and the draws buffered for one store chunk (with `store.probe=moments`
also the chains' per-token sums and the copy being written).
"""

from spectro.gpus import GPU, GPUS  # noqa: F401
from spectro.plan.make import format_plan, make_plan, run_plan  # noqa: F401
from spectro.plan.timing import (BW_EFFICIENCY, EFFICIENCY, LAUNCH_S, CpuLoad, OpCount, calibrate, fit,  # noqa: F401
                                 load_stretch, other_demand, schedule, unit_seconds_cpu)
from spectro.plan.work import (ACTOR_START_S, Shape, actor_memory, checkpoint_moment_bytes,  # noqa: F401
                               store_arrays, unit_work)
