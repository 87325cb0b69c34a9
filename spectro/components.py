"""Named components of a GPT-NeoX model and their parameter masks (docs/method.md).

A component is a set of parameter entries that SGLD samples while every other
entry stays at w*. Names and the canonical order:

    embed, l0h0 .. l0h{H-1}, l0.mlp, l1h0, ..., l{L-1}.mlp, unembed

(Pythia-14M: 1 + 6 * (4 + 1) + 1 = 32), plus ``full`` (every parameter),
which is never part of a group and must be asked for by name. Group keywords:
``all`` (every component above), ``heads``, ``mlps``.

Non-obvious choices:
- Which entries of which parameters a head or an MLP owns is the
  architecture adapter's knowledge (`spectro.neox`: parameter names and the
  fused QKV layout); ``tests/test_components.py`` checks it behaviourally.
- ``attention.dense.bias`` is shared by all heads of a layer, and LayerNorm
  weights and biases belong to no head or MLP: these are sampled only by
  ``full``. So the components of ``all`` plus LayerNorms plus the dense biases
  partition the parameters exactly.
- ``layer`` is the lowest transformer layer whose computation a component
  changes: ``embed`` and ``full`` -> 0, ``l{i}...`` -> i, ``unembed`` ->
  n_layers (only the head after the last layer changes). Callers can reuse the
  residual stream below that layer.
- Masks are dense bool tensors of the parameter's shape on the parameter's
  device, or None for "the whole tensor". ``shapes`` records every named
  parameter's shape, so ``n_parameters`` needs no model.
- Components compare by identity (``eq=False``): their fields hold tensors.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spectro import neox
from spectro.errors import ComponentError

GROUPS = ("all", "heads", "mlps")
FULL = "full"

_HEAD = re.compile(r"^l(\d+)h(\d+)$")
_MLP = re.compile(r"^l(\d+)\.mlp$")
EMBED_PARAM = neox.EMBED_PARAM
UNEMBED_PARAM = neox.UNEMBED_PARAM


@dataclass(frozen=True, eq=False)
class Component:
    """One named component: which entries of which parameters SGLD samples."""

    name: str
    layer: int
    masks: dict[str, torch.Tensor | None]  # parameter name -> bool mask of its shape, or None = whole tensor
    shapes: dict[str, tuple[int, ...]]     # parameter name -> its shape (same keys as masks)

    @property
    def n_parameters(self) -> int:
        """Number of sampled entries."""
        total = 0
        for name, mask in self.masks.items():
            total += int(mask.sum()) if mask is not None else _numel(self.shapes[name])
        return total


def weight_norm(component: Component, model: torch.nn.Module) -> float:
    """||w*_C||: the Euclidean norm of the component's sampled entries at the model's weights (float64)."""
    params = dict(model.named_parameters())
    total = 0.0
    for name, mask in component.masks.items():
        w = params[name].detach().double()
        total += float((w[mask] if mask is not None else w).pow(2).sum())
    return total ** 0.5


def all_component_names(config) -> list[str]:
    """Every component of a GPT-NeoX config in canonical order (``full`` excluded)."""
    n_layers, n_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    names = ["embed"]
    for i in range(n_layers):
        names += [f"l{i}h{j}" for j in range(n_heads)]
        names.append(f"l{i}.mlp")
    names.append("unembed")
    return names


def resolve_components(model: torch.nn.Module, names: str | Sequence[str]) -> list[Component]:
    """Components for `names` (component names and/or group keywords), in the
    order given, groups expanded in canonical order."""
    config = model.config
    n_layers = int(config.num_hidden_layers)
    n_heads = int(config.num_attention_heads)
    head_dim = int(config.hidden_size) // n_heads
    requested = _expand(names, all_component_names(config), n_layers, n_heads)

    params = dict(model.named_parameters())
    return [_build(name, params, n_layers, head_dim) for name in requested]


# --- names -----------------------------------------------------------------


def _expand(names: str | Sequence[str], valid: list[str], n_layers: int, n_heads: int) -> list[str]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ComponentError(f"components must be a name or a list of names, got {names!r}")
    if len(names) == 0:
        raise ComponentError("no components given; name at least one, e.g. 'all', 'heads', 'l0h1' or 'full'")

    known = set(valid) | {FULL}
    out: list[str] = []
    for name in names:
        if name == "all":
            out += valid
        elif name == "heads":
            out += [n for n in valid if _HEAD.match(n)]
        elif name == "mlps":
            out += [n for n in valid if _MLP.match(n)]
        elif name in known:
            out.append(name)
        else:
            raise ComponentError(_unknown_message(name, valid, n_layers, n_heads))

    dup = [n for n, count in Counter(out).items() if count > 1]
    if dup:
        raise ComponentError(
            f"component(s) {dup} requested more than once (after expanding the groups "
            f"in {list(names)}); list each component once"
        )
    return out


def _unknown_message(name: str, valid: list[str], n_layers: int, n_heads: int) -> str:
    close = difflib.get_close_matches(name, valid + [FULL, *GROUPS], n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown component {name!r}. Valid names for this model: 'embed', 'unembed', 'full', "
        f"'l{{i}}h{{j}}' (heads, i in 0..{n_layers - 1}, j in 0..{n_heads - 1}), "
        f"'l{{i}}.mlp' (MLPs, i in 0..{n_layers - 1}), and the groups 'all', 'heads', 'mlps'.{hint}"
    )


# --- masks -----------------------------------------------------------------


def _build(name: str, params: dict[str, torch.nn.Parameter], n_layers: int, head_dim: int) -> Component:
    if name == FULL:
        return _component(name, 0, {p: None for p in params}, params)
    if name == "embed":
        return _component(name, 0, {EMBED_PARAM: None}, params)
    if name == "unembed":
        return _component(name, n_layers, {UNEMBED_PARAM: None}, params)
    if m := _MLP.match(name):
        i = int(m.group(1))
        return _component(name, i, {p: None for p in neox.mlp_params(i)}, params)
    m = _HEAD.match(name)
    i, j = int(m.group(1)), int(m.group(2))
    return _component(name, i, _head_masks(i, j, params, head_dim), params)


def _head_masks(i: int, j: int, params: dict[str, torch.nn.Parameter], head_dim: int) -> dict[str, torch.Tensor]:
    qkv_w, qkv_b, dense_w = neox.attention_params(i)
    rows = neox.head_qkv_rows(j, head_dim)                  # head j's q, k, v outputs of the fused projection
    cols = neox.head_output_cols(j, head_dim)               # head j's slice of the concatenated head outputs

    masks: dict[str, torch.Tensor] = {}
    w = _param(params, qkv_w)
    masks[qkv_w] = torch.zeros_like(w, dtype=torch.bool)    # (3*hidden, hidden)
    masks[qkv_w][rows, :] = True
    if qkv_b in params:                                     # absent when config.attention_bias is False
        masks[qkv_b] = torch.zeros_like(params[qkv_b], dtype=torch.bool)  # (3*hidden,)
        masks[qkv_b][rows] = True
    d = _param(params, dense_w)
    masks[dense_w] = torch.zeros_like(d, dtype=torch.bool)  # (hidden, hidden): out x in
    masks[dense_w][:, cols] = True
    return masks


def _component(name: str, layer: int, masks: dict, params: dict[str, torch.nn.Parameter]) -> Component:
    shapes = {p: tuple(_param(params, p).shape) for p in masks}
    return Component(name=name, layer=layer, masks=masks, shapes=shapes)


def _param(params: dict[str, torch.nn.Parameter], name: str) -> torch.nn.Parameter:
    if name not in params:
        raise ComponentError(
            f"the model has no parameter {name!r}; components are defined for transformers' "
            "GPTNeoXForCausalLM with untied embeddings (load it with spectro.model.load_model)"
        )
    return params[name]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
