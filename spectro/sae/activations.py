"""The language model's activations at an SAE site, and how well an SAE
stands in for them.

`collect_activations` runs the real transformers module with a forward hook
on block L (site `resid_post`: the residual stream after block L) or on its
MLP (site `mlp_out`: the MLP's output, before it is added to the stream);
the architecture adapter (`spectro.neox`) names those modules.
`fve` is the fraction of variance an SAE explains; `spliced_losses` the
model's loss with the SAE's reconstruction spliced in place of the real
activation, beside the clean and mean-ablated losses.
"""

from __future__ import annotations

import torch

from spectro import neox
from spectro.errors import SAEError
from spectro.sae.model import SAE, SITES


def _site_module(model: torch.nn.Module, site: str, layer: int) -> torch.nn.Module:
    if site not in SITES:
        raise SAEError(f"sae.site {site!r} is not one of {', '.join(SITES)}; pick one of those")
    layers = neox.layers(model)
    if not 0 <= layer < len(layers):
        raise SAEError(f"sae.layer {layer} is out of range: the model has layers 0..{len(layers) - 1}; "
                       f"pick one of those")
    return layers[layer] if site == "resid_post" else neox.mlp(layers[layer])


class _Stop(Exception):
    """Raised by a capture hook to skip the rest of the forward pass (the unembedding dominates its cost)."""


@torch.no_grad()
def collect_activations(model: torch.nn.Module, input_ids: torch.Tensor, site: str, layer: int,
                        batch_size: int = 64) -> torch.Tensor:
    """(n_contexts, seq_len, d_model) float32 activations at `site` of `layer` for every position."""
    module = _site_module(model, site, layer)
    out: list[torch.Tensor] = []

    def grab(_mod, _inp, output):
        out.append((output[0] if isinstance(output, tuple) else output).detach().float())
        raise _Stop

    handle = module.register_forward_hook(grab)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                neox.backbone(model)(input_ids=input_ids[i:i + batch_size])
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(out)                                           # (n_ctx, seq, d)


def fve(sae: SAE, x: torch.Tensor, chunk: int = 8192) -> float:
    """Fraction of variance explained, 1 - sum||x - x̂||^2 / sum||x - mean x||^2, accumulated in float64."""
    x = x.reshape(-1, x.shape[-1])
    mean = x.double().mean(dim=0)
    resid = total = 0.0
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        resid += float(((xb.double() - sae.reconstruct(xb).double()) ** 2).sum())
        total += float(((xb.double() - mean) ** 2).sum())
    return 1.0 - resid / total if total > 0 else float("nan")


@torch.no_grad()
def spliced_losses(model: torch.nn.Module, input_ids: torch.Tensor, sae: SAE, site: str, layer: int,
                   mean_act: torch.Tensor, batch_size: int = 32) -> dict:
    """Mean next-token loss of the model as is, with the site's output replaced by the SAE reconstruction,
    and with it replaced by its mean (mean ablation); float64 sums."""
    module = _site_module(model, site, layer)
    mode = {"v": "clean"}

    def replace(_mod, _inp, output):
        h = output[0] if isinstance(output, tuple) else output          # (B, T, d)
        if mode["v"] == "sae":
            new = sae.reconstruct(h.reshape(-1, h.shape[-1])).reshape(h.shape).to(h.dtype)
        elif mode["v"] == "mean":
            new = mean_act.to(h.dtype).expand_as(h)
        else:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    out = {}
    handle = module.register_forward_hook(replace)
    try:
        for m in ("clean", "sae", "mean"):
            mode["v"] = m
            total, count = 0.0, 0
            for i in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[i:i + batch_size]
                logits = model(input_ids=ids).logits[:, :-1].double()  # (B, T-1, V)
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                        reduction="sum")
                total += float(nll)
                count += ids[:, 1:].numel()
            out[m] = total / count
    finally:
        handle.remove()
    gap = out["mean"] - out["clean"]
    return {"loss_clean": out["clean"], "loss_spliced": out["sae"], "loss_mean_ablation": out["mean"],
            "loss_increase": out["sae"] - out["clean"],
            "loss_recovered": 1.0 - (out["sae"] - out["clean"]) / gap if gap > 0 else float("nan")}
