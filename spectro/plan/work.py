"""The plan's counts: units, steps and FLOPs per unit, the sample store's logical bytes per
array in either probe store mode, and peak memory per actor (models in `spectro.plan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spectro.probes import probe_context_count
from spectro.traces import TRACES

CE_ROWS = 128                  # token rows per chain per head block (spectro.observables.CE_ROWS)
BODY_ROWS = 4096               # token rows per evaluation chunk (spectro.observables.BODY_ROWS)
RUNTIME_BYTES = 400 << 20      # resident set of a process that imported torch, transformers, ray, zarr (measured)
GENERATOR_STATE_BYTES = 5056  # torch.Generator.get_state() of a CPU generator (Mersenne Twister), per stream and chain
ACTOR_START_S = 5.0            # ray.put of the payload and constructing the actors, before the first unit runs


# ---------------------------------------------------------------- shapes and counts


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    seq: int
    n_parameters: int

    @staticmethod
    def of(model, seq: int) -> "Shape":
        c = model.config
        return Shape(int(c.hidden_size), int(c.intermediate_size), int(c.vocab_size), int(c.num_hidden_layers),
                     int(c.num_attention_heads), int(seq), sum(p.numel() for p in model.parameters()))

    def fwd(self, start: int) -> float:
        """Forward FLOPs per token of layers `start..` and the head."""
        H, I, T = self.hidden, self.intermediate, self.seq
        return (self.layers - start) * (2 * (4 * H * H + 2 * H * I) + 4 * T * H) + 2 * H * self.vocab


def cached_from(component) -> int:
    """The layer a unit's forward starts from (the lower-layer cache applies for layer >= 1)."""
    return component.layer if component.layer >= 1 else 0


def sampled_entries(component) -> int:
    """Entries of the tensors a unit's SGLD state holds per chain (whole tensors; masks zero the rest)."""
    return sum(math.prod(s) for s in component.shapes.values())


def dense_sampled(component, shape: Shape) -> int:
    embed = "gpt_neox.embed_in.weight" in component.masks
    return component.n_parameters - (shape.vocab * shape.hidden if embed else 0)


def unit_work(component, chains: int, config, shape: Shape, probe_contexts: int | None = None) -> dict:
    """Counts and FLOPs of one unit (component, `chains` chains, `probe_contexts` probe contexts: its shard's,
    default all). Every probe shard of a chain group repeats the SGLD steps and the sampling-set evaluation."""
    s, d = config.sampler, config.data
    n_probe = probe_context_count(d) if probe_contexts is None else probe_contexts
    start = cached_from(component)
    act = shape.fwd(component.layer) if component.layer < shape.layers else 0.0
    steps = s.burnin + s.num_draws * s.steps_between_draws
    step_tokens = chains * s.batch_size * d.seq_len
    eval_tokens = (d.n_sampling_contexts + n_probe) * d.seq_len
    step = step_tokens * (shape.fwd(start) + act + 2 * dense_sampled(component, shape))
    ev = eval_tokens * shape.fwd(start)
    cache_tokens = (d.n_train_contexts + d.n_sampling_contexts + n_probe) * d.seq_len
    cache = cache_tokens * (shape.fwd(0) - shape.fwd(start)) if start else 0.0
    return {"component": component.name, "chains": chains, "layer": component.layer, "start_layer": start,
            "sampled_entries": sampled_entries(component), "n_parameters": component.n_parameters,
            "probe_contexts": n_probe,
            "flops_probe_evals": chains * s.num_draws * n_probe * d.seq_len * shape.fwd(start),
            "steps": steps, "chain_draws": chains * s.num_draws, "evaluations": chains * s.num_draws,
            "flops_per_step": step, "flops_per_eval": ev, "flops_cache": cache,
            "flops_steps": steps * step, "flops_evals": chains * s.num_draws * ev}


# ---------------------------------------------------------------- the store

_F8, _F4, _I8, _I4 = 8, 4, 8, 4


def _utf8(values) -> int:
    return int(sum(len(str(v).encode("utf-8")) for v in values))


def store_arrays(layout, probe, mode: str | None = None) -> dict:
    """Logical (uncompressed) bytes of every array `SampleStore._create` makes for probe store `mode` (default
    the layout's, `store.probe`): {name: {shape, dtype, bytes}}. String arrays count their UTF-8 bytes.
    "draws" keeps `probe_loss` per draw and token; "moments" keeps instead `estimator.ChainMoments`'s sums
    per (component, chain) in two alternating slots: n, sum phi, sum phi^2 (one copy per probe shard) and,
    per token, sum phi*D and sum D. The per-draw scalar traces (R-hat, ESS, divergence) and the probe table
    are the same in both."""
    C, N, D, T = len(layout.components), layout.n_chains, layout.n_draws, layout.n_tokens
    mode = mode or layout.probe
    out = {}

    def add(name, shape, dtype, size):
        n = math.prod(shape)
        out[name] = {"shape": list(shape), "dtype": dtype, "bytes": int(n * size)}

    add("sampling_loss", (C, N, D), "float64", _F8)
    if mode == "draws":
        add("probe_loss", (C, N, D, T), "float32", _F4)
    else:
        for name in ("moment_n", "moment_phi", "moment_phi2", "moment_phiD", "moment_D"):   # scalars: per shard
            add(name, layout.moment_array(name)[0], "int64" if name == "moment_n" else "float64", _I8)
    for t in TRACES:                                   # the per-draw observables (spectro.traces)
        add(t.name, (C, N, D), t.dtype, np.dtype(t.dtype).itemsize)
    add("diverged_at", (C, N), "int64", _I8)
    add("progress", (C, N, layout.probe_shards) if layout.probe_shards > 1 else (C, N), "int64", _I8)
    out["component"] = {"shape": [C], "dtype": "str", "bytes": _utf8(layout.components)}
    add("token_context", (T,), "int32", _I4)
    add("token_position", (T,), "int32", _I4)
    add("token_id", (T,), "int64", _I8)
    out["token_text"] = {"shape": [T], "dtype": "str", "bytes": _utf8(probe.token_text)}
    out["token_source"] = {"shape": [T], "dtype": "str", "bytes": _utf8(probe.token_source)}
    add("probe_input_ids", (layout.n_contexts, layout.seq_len), "int64", _I8)
    if len(probe.label_names):
        out["label"] = {"shape": [len(probe.label_names)], "dtype": "str", "bytes": _utf8(probe.label_names)}
        add("token_labels", (T, len(probe.label_names)), "bool", 1)
    return out


def checkpoint_moment_bytes(chains: int, n_tokens: int) -> int:
    """What a moments-mode checkpoint adds per unit: its chains' sums (n int64, phi and phi^2 float64, and per
    token phi*D and D float64)."""
    return chains * (3 * 8 + 2 * 8 * n_tokens)


# ---------------------------------------------------------------- memory


def actor_memory(config, shape: Shape, units: list[dict]) -> dict:
    """Peak resident bytes of one actor (model in the module doc), and the unit that sets it."""
    s, d = config.sampler, config.data
    H, I, V, T = shape.hidden, shape.intermediate, shape.vocab, shape.seq
    model = shape.n_parameters * 4
    data = (d.n_train_contexts + d.n_sampling_contexts + probe_context_count(d)) * T * 8
    per_token_layer = 4 * (11 * H + 2 * I + 2 * shape.heads * T)
    best = None
    for u in units:
        g, S, start = u["chains"], u["sampled_entries"], u["start_layer"]
        state = 3 * g * S * 4 + (2 * g * S * 4 if s.precondition == "rmsprop" else 0) + S   # + bool masks
        n_probe = u.get("probe_contexts", probe_context_count(d))    # a probe shard caches its contexts only
        cache = (d.n_train_contexts + d.n_sampling_contexts + n_probe) * T * H * 4 if start else 0
        step_act = g * s.batch_size * T * ((shape.layers - start) * per_token_layer + 2 * H * 4) + g * CE_ROWS * V * 4
        rows = max(T, BODY_ROWS // T * T)
        eval_act = rows * per_token_layer + CE_ROWS * V * 4
        buffer = 2 * min(s.checkpoint_every, s.num_draws) * g * u["n_tokens"] * 4
        if config.store.probe == "moments":
            buffer += 2 * g * u["n_tokens"] * 2 * 8        # the chains' per-token sums, and their copy being written
        total = state + cache + max(step_act, eval_act) + buffer
        if best is None or total > best["unit_bytes"]:
            best = {"component": u["component"], "unit_bytes": total, "chain_state": state, "cache": cache,
                    "activations": max(step_act, eval_act), "draw_buffer": buffer}
    peak = RUNTIME_BYTES + model + data + best["unit_bytes"]
    return {"peak_bytes": int(peak), "runtime": RUNTIME_BYTES, "model": model, "data": data,
            **{k: (int(v) if not isinstance(v, str) else v) for k, v in best.items()}}
