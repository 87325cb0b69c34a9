"""The sparse autoencoder and its on-disk format.

`SAE` is an inference-time autoencoder in SAELens conventions;
`load_sae`/`save_sae` read and write the SAELens layout (`cfg.json` +
`sae_weights.safetensors` holding `W_enc (d_in, d_sae)`, `b_enc (d_sae)`,
`W_dec (d_sae, d_in)`, `b_dec (d_in)`); `hook_name` and `parse_hook_name`
translate between (site, layer) and SAELens/TransformerLens hook names.

Non-obvious choices:
- A loaded SAE may be `topk`, `standard` (ReLU) or `jumprelu` (with a
  `threshold` tensor); only safetensors are read (nothing is unpickled).
- `save_sae` writes the weights to a temporary file renamed into place, then
  cfg.json through spectro.rundir's atomic writer (the config last).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from spectro import rundir
from spectro.errors import SAEError


SITES = ("resid_post", "mlp_out")
POSITIONS = ("predicting", "token")
ARCHITECTURES = ("topk", "standard", "jumprelu")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|mlp_out)$")


def hook_name(site: str, layer: int) -> str:
    """SAELens/TransformerLens name of an activation site."""
    return f"blocks.{layer}.hook_{site}"


def parse_hook_name(name: str) -> Optional[tuple[str, int]]:
    """(site, layer) of a TransformerLens hook name like blocks.2.hook_resid_post, or None."""
    m = _HOOK.match(name or "")
    return (m.group(2), int(m.group(1))) if m else None


@dataclass
class SAE:
    """Inference-time SAE in SAELens conventions: f = act((x - b_dec·a) W_enc + b_enc), x̂ = f W_dec + b_dec."""
    W_enc: torch.Tensor                 # (d_in, d_sae)
    b_enc: torch.Tensor                 # (d_sae,)
    W_dec: torch.Tensor                 # (d_sae, d_in)
    b_dec: torch.Tensor                 # (d_in,)
    architecture: str = "topk"          # "topk" | "standard" | "jumprelu"
    k: Optional[int] = None             # topk only
    threshold: Optional[torch.Tensor] = None   # jumprelu only, (d_sae,)
    apply_b_dec_to_input: bool = True
    hook_name: str = ""
    meta: dict = field(default_factory=dict)   # training settings and results, saved into cfg.json

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d_in) -> (n, d_sae) non-negative feature activations (dense)."""
        x = x.to(self.W_enc.dtype)
        pre = (x - self.b_dec * float(self.apply_b_dec_to_input)) @ self.W_enc + self.b_enc   # (n, d_sae)
        if self.architecture == "topk":
            vals, idx = pre.topk(self.k, dim=-1)                                             # (n, k)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.clamp_min(0))
        if self.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        return pre.clamp_min(0)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec                                                   # (n, d_in)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def save_sae(sae: SAE, directory: rundir.PathLike) -> rundir.Location:
    """Write sae_weights.safetensors, then cfg.json, into `directory` (a local path or a URL), each whole
    (spectro.rundir.Location.write_bytes: temp file and rename, or one PUT)."""
    import safetensors.torch

    directory = rundir.location(directory)
    directory.mkdir()
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    cfg = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
           "hook_name": sae.hook_name, "metadata": {"hook_name": sae.hook_name, **sae.meta}}
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["activation_fn_kwargs"] = {"k": sae.k}
    (directory / WEIGHTS_FILE).write_bytes(
        safetensors.torch.save({k: v.detach().float().contiguous() for k, v in tensors.items()}))
    rundir.write_json(directory / CFG_FILE, cfg, indent=2, allow_nan=True)
    return directory


def _read_files(directory: Path) -> tuple[dict, dict]:
    """(config, float tensors) of a SAELens-layout directory; SAEError for a missing, unreadable or pickled file."""
    import safetensors
    import safetensors.torch

    where = f"SAE directory {directory}"
    if not directory.is_dir():
        raise SAEError(f"{where} does not exist; point sae.load at a directory with {CFG_FILE} and {WEIGHTS_FILE}")
    cfg_path, w_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    if not w_path.exists():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
        hint = (f" It holds {', '.join(pickles)}: pickle files are never loaded (they can run code); convert them "
                f"to safetensors (safetensors.torch.save_file)." if pickles else "")
        raise SAEError(f"{where} has no {WEIGHTS_FILE}.{hint}")
    if not cfg_path.exists():
        raise SAEError(f"{where} has no {CFG_FILE}; it must give at least d_in, d_sae and architecture")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SAEError(f"{cfg_path} is not valid JSON ({e}); fix or regenerate it") from None
    if not isinstance(cfg, dict):
        raise SAEError(f"{cfg_path} must hold a JSON object")
    try:
        with safetensors.safe_open(str(w_path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k).float() for k in fh.keys()}
    except Exception as e:   # safetensors raises several types for a non-safetensors file
        first = str(e).splitlines()[0] if str(e) else ''
        raise SAEError(f"{w_path} is not a readable safetensors file ({type(e).__name__}: {first}); "
                       f"pickled weights are refused: save them with safetensors.torch.save_file") from None
    return cfg, tensors


def load_sae(directory: Path, d_in: Optional[int] = None) -> SAE:
    """Read a SAELens-layout SAE directory; every problem is one SAEError saying what to fix."""
    directory = Path(directory)
    where = f"SAE directory {directory}"
    cfg_path, w_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    cfg, tensors = _read_files(directory)
    arch = str(cfg.get("architecture", "standard"))
    if arch not in ARCHITECTURES:
        raise SAEError(f"{cfg_path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    missing = [k for k in need if k not in tensors]
    if missing:
        raise SAEError(f"{w_path} lacks tensor(s) {', '.join(missing)} (has {', '.join(sorted(tensors)) or 'none'}); "
                       f"a SAELens SAE stores W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in)")
    W_enc = tensors["W_enc"]
    if W_enc.ndim != 2:
        raise SAEError(f"{w_path}: W_enc must be 2-D (d_in, d_sae), got shape {tuple(W_enc.shape)}")
    di, ds = (int(cfg.get("d_in", W_enc.shape[0])), int(cfg.get("d_sae", W_enc.shape[1])))
    want = {"W_enc": (di, ds), "b_enc": (ds,), "W_dec": (ds, di), "b_dec": (di,), "threshold": (ds,)}
    for k in need:
        if tuple(tensors[k].shape) != want[k]:
            raise SAEError(f"{w_path}: {k} has shape {tuple(tensors[k].shape)} but d_in={di}, d_sae={ds} "
                           f"({CFG_FILE}) need {want[k]}")
        if not torch.isfinite(tensors[k]).all():
            raise SAEError(f"{w_path}: {k} holds NaN or infinite values")
    if d_in is not None and di != d_in:
        raise SAEError(f"{where} takes d_in={di} activations but the model's width is {d_in}; "
                       f"use an SAE trained on this model")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise SAEError(f"{cfg_path}: normalize_activations={norm!r} is not supported (its scale factor is not "
                       f"part of the files); fold the scale into the weights and set it to 'none'")
    k = None
    if arch == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int) or not 1 <= k <= ds:
            raise SAEError(f"{cfg_path}: a topk SAE needs an integer k in 1..{ds} (key 'k' or "
                           f"activation_fn_kwargs.k), got {k!r}")
    name = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name") or ""
    return SAE(W_enc=W_enc, b_enc=tensors["b_enc"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
               architecture=arch, k=k, threshold=tensors.get("threshold"),
               apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), hook_name=str(name),
               meta=dict(cfg.get("metadata") or {}))
