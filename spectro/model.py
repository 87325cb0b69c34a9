"""Load a GPT-NeoX causal LM (Pythia) and its tokenizer, with provenance.

A *source* is one of
- ``"embedded"``: the small model shipped in ``spectro/assets/default_model``;
- a local directory laid out like a hub snapshot: ``config.json``, weights
  (``model.safetensors``, ``pytorch_model.bin``, or a sharded set with its
  ``*.index.json``) and ``tokenizer.json``;
- a hub id such as ``EleutherAI/pythia-14m`` with a ``revision`` such as
  ``step143000``, fetched by ``huggingface_hub.snapshot_download`` (which uses
  the local HF cache when the files are there).
All three end in the same directory loader, so a test that loads a local
snapshot exercises the code that loads a real hub checkpoint.

Non-obvious choices:
- We do not call ``from_pretrained``. The model is built from its config and
  the state dict is loaded with ``strict=True`` ourselves, so no weight can be
  left randomly initialised without an error that names it, and nothing is
  ever unpickled unsafely: safetensors is preferred, and a ``.bin`` is read only
  with ``torch.load(weights_only=True)``, which refuses pickles that would
  import or call anything but tensor rebuilders.
- Key names: hub Pythia files call the head ``embed_out.weight``; transformers 5
  calls it ``lm_head.weight`` (its own ``conversion_mapping`` renames
  ``^embed_out.`` to ``lm_head.``; we apply the same rename). Hub files also
  carry per-layer buffers that current transformers computes instead
  (``attention.bias`` causal mask, ``attention.masked_bias``,
  ``attention.rotary_emb.inv_freq``); exactly these are dropped. Any other
  unexpected or missing key is an error.
- Building the model runs transformers' random init, which is then fully
  overwritten; it runs under ``torch.random.fork_rng`` so loading a model does
  not change the caller's global RNG stream.
- Weights are cast to float32 (hub Pythia checkpoints are fp16; the cast is
  exact) and the attention is ``eager``, because ``torch.func.vmap`` over the
  SDPA path falls back to a slow loop on CPU (docs/performance.md).
- ``config.use_cache`` is set to False: spectro only evaluates losses, and a
  KV cache is wasted work inside SGLD steps.
- Tied input/output embeddings are refused: the ``embed`` and ``unembed``
  components would then be one tensor. Pythia is untied.
- Every file that was read is hashed (sha256) into the provenance, so a
  result names exactly the weights it came from. ``revision`` is only
  meaningful for a hub id and is refused for other sources.
- The hub is contacted only for a hub id and only with ``allow_download``.
  With no network, ``snapshot_download`` falls back to the cache and otherwise
  fails at once on a refused or unresolvable connection. (The hub client sets
  no timeout on its first metadata request, so a network that silently drops
  packets can stall until the OS gives up connecting; ``HF_HUB_OFFLINE=1`` or
  ``allow_download=False`` skips the network entirely.)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import tokenizers
import torch

import spectro
from spectro import neox
from spectro.config import ModelConfig
from spectro.errors import ModelLoadError

_M = ModelConfig()        # the schema's defaults: the one place they are written

EMBEDDED_MODEL_DIR: Path = Path(spectro.__file__).parent / "assets" / "default_model"

ARCHITECTURE = neox.ARCHITECTURE

# Weight files, in order of preference. A sharded set is named by its index.
_WEIGHT_CANDIDATES = (
    ("model.safetensors", "safetensors"),
    ("model.safetensors.index.json", "safetensors-index"),
    ("pytorch_model.bin", "bin"),
    ("pytorch_model.bin.index.json", "bin-index"),
)
# What a hub download fetches: configs, tokenizer, safetensors weights. A
# `.bin` is fetched only when a revision has no safetensors.
_HUB_PATTERNS = ["*.json", "*.safetensors"]
_HUB_BIN_PATTERNS = ["pytorch_model*.bin"]

_HEAD_RENAMES = neox.HEAD_RENAMES
_LEGACY_BUFFERS = neox.LEGACY_BUFFERS
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    """A float32, eval-mode, frozen GPT-NeoX model with its tokenizer."""

    model: neox.Model
    tokenizer: tokenizers.Tokenizer
    provenance: dict

    @property
    def max_positions(self) -> int:
        """Longest context (in tokens) the model's position encoding was built for."""
        return int(self.model.config.max_position_embeddings)


def resolve_model_dir(
    source: str, revision: str | None = _M.revision, *, allow_download: bool = _M.allow_download
) -> tuple[Path, dict]:
    """Turn a source into a local snapshot directory and partial provenance
    ({"source", "id", "revision", "path"}, plus "commit" for a hub id)."""
    if not isinstance(source, str) or not source.strip():
        raise ModelLoadError(
            f"model source {source!r} is empty; use 'embedded', a local snapshot directory, "
            "or a hub id such as 'EleutherAI/pythia-14m'"
        )
    if source == "embedded":
        _refuse_revision(source, revision)
        if not EMBEDDED_MODEL_DIR.is_dir():
            raise ModelLoadError(
                f"the embedded model is missing (expected a directory at {EMBEDDED_MODEL_DIR}); "
                "the spectro installation is incomplete: reinstall the package, or pass a local "
                "snapshot directory as the model source"
            )
        path = EMBEDDED_MODEL_DIR.resolve()
        return path, {"source": "embedded", "id": "embedded", "revision": None, "path": str(path)}

    local = Path(source).expanduser()
    if local.exists():
        _refuse_revision(source, revision)
        if not local.is_dir():
            raise ModelLoadError(
                f"model source {source!r} is a file; pass the directory that holds config.json, "
                "the weights and tokenizer.json"
            )
        path = local.resolve()
        return path, {"source": "local", "id": str(path), "revision": None, "path": str(path)}

    if not _HUB_ID.match(source):
        raise ModelLoadError(
            f"model source {source!r} does not exist as a local directory and is not a hub id "
            "of the form 'owner/name'; check the path, or use 'embedded'"
        )
    path = _hub_snapshot(source, revision, allow_download)
    return path, {
        "source": "hub",
        "id": source,
        "revision": revision or "main",
        "commit": path.name,  # snapshot directories are named by commit hash
        "path": str(path),
    }


def load_model(
    source: str = _M.source,
    revision: str | None = _M.revision,
    *,
    device: str | torch.device = "cpu",
    allow_download: bool = _M.allow_download,
) -> LoadedModel:
    """Load a GPT-NeoX causal LM and its tokenizer from `source` (see module doc)."""
    directory, provenance = resolve_model_dir(source, revision, allow_download=allow_download)
    files: dict[str, str] = {}

    config = _read_config(directory, files)
    tokenizer = _read_tokenizer(directory, files)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ModelLoadError(
            f"tokenizer.json in {directory} has {tokenizer.get_vocab_size()} tokens but the model's "
            f"embedding has only vocab_size={config.vocab_size} rows: some token ids would have no "
            "embedding. Use the tokenizer that belongs to this checkpoint"
        )
    training = None
    if (directory / "training.json").is_file():
        training = _read_json(directory / "training.json", files)
    state = _read_weights(directory, files)

    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the global RNG
        model = neox.build(config)
    _load_state(model, state, directory)
    model.eval()
    model.requires_grad_(False)
    try:
        model.to(device)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise ModelLoadError(f"cannot move the model to device {device!r}: {err}") from err

    provenance.update(
        files=dict(sorted(files.items())),
        n_parameters=sum(p.numel() for p in model.parameters()),
        architecture=ARCHITECTURE,
        config=_config_summary(config),
    )
    if training is not None:
        provenance["training"] = training
    return LoadedModel(model=model, tokenizer=tokenizer, provenance=provenance)


# --- sources ---------------------------------------------------------------


def _refuse_revision(source: str, revision: str | None) -> None:
    if revision is not None:
        raise ModelLoadError(
            f"revision={revision!r} was given for model source {source!r}, but a revision only "
            "applies to a hub id (e.g. 'EleutherAI/pythia-14m' with revision 'step143000'); "
            "drop the revision or use a hub id"
        )


def _hub_snapshot(repo_id: str, revision: str | None, allow_download: bool) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    def fetch(patterns: list[str]) -> Path:
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=not allow_download,
        ))

    where = f"hub model {repo_id!r} (revision {revision or 'main'!r})"
    try:
        path = fetch(_HUB_PATTERNS)
        if not any((path / name).is_file() for name, kind in _WEIGHT_CANDIDATES if kind.startswith("safetensors")):
            path = fetch(_HUB_PATTERNS + _HUB_BIN_PATTERNS)
    except IncompleteSnapshotError as err:
        raise ModelLoadError(
            f"the cached snapshot of {where} is incomplete ({_first_line(err)}); fetch it again with "
            "network access, or pass a complete local snapshot directory as the model source"
        ) from err
    except LocalEntryNotFoundError as err:
        if not allow_download:
            raise ModelLoadError(
                f"{where} is not in the local Hugging Face cache and allow_download=False; "
                "allow downloads, or pass a local snapshot directory (config.json, "
                "model.safetensors, tokenizer.json) as the model source"
            ) from err
        raise ModelLoadError(
            f"{where} could not be fetched: the Hugging Face hub is unreachable and the files are "
            f"not in the local cache ({err.__class__.__name__}: {_first_line(err)}). Copy a snapshot "
            "(config.json, model.safetensors, tokenizer.json) to this machine and pass its "
            "directory as the model source"
        ) from err
    except Exception as err:  # the hub client raises its own HTTP and transport error types
        raise ModelLoadError(
            f"{where} could not be fetched from the Hugging Face hub "
            f"({err.__class__.__name__}: {_first_line(err)}); check the id and revision, "
            "or pass a local snapshot directory as the model source"
        ) from err
    return path


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


# --- files -----------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path, files: dict[str, str]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} is not readable JSON ({err}); the snapshot is corrupted, fetch it again") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    files[path.name] = _sha256(path)
    return data


def _read_config(directory: Path, files: dict[str, str]) -> neox.Config:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{directory} has no config.json; a model directory must be a hub-layout snapshot with "
            "config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json"
        )
    raw = _read_json(path, files)
    model_type = raw.get("model_type")
    if model_type != neox.MODEL_TYPE:
        raise ModelLoadError(
            f"{path} declares model_type={model_type!r}; only GPT-NeoX-style causal LMs "
            "(model_type 'gpt_neox', e.g. the Pythia models) are supported"
        )
    architectures = raw.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in architectures:
        raise ModelLoadError(
            f"{path} declares architectures={architectures}; only {ARCHITECTURE} (a causal LM with "
            "a language-modelling head) is supported"
        )
    try:
        config = neox.config_from_dict(raw)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{path} is not a valid GPT-NeoX config: {err}") from err
    if config.tie_word_embeddings:
        raise ModelLoadError(
            f"{path} sets tie_word_embeddings=true; spectro needs separate input and output "
            "embeddings (its 'embed' and 'unembed' components would otherwise be one tensor). "
            "Pythia models are untied"
        )
    if config.hidden_size % config.num_attention_heads != 0:
        raise ModelLoadError(
            f"{path}: hidden_size={config.hidden_size} is not divisible by "
            f"num_attention_heads={config.num_attention_heads}"
        )
    config._attn_implementation = "eager"
    config.use_cache = False
    return config


def _read_tokenizer(directory: Path, files: dict[str, str]) -> tokenizers.Tokenizer:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{directory} has no tokenizer.json; copy the checkpoint's tokenizer.json (the "
            "'fast' tokenizer file of the hub repo) into the directory"
        )
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ModelLoadError(f"{path} is not a valid tokenizers file: {err}") from err
    files[path.name] = _sha256(path)
    return tokenizer


def _read_weights(directory: Path, files: dict[str, str]) -> dict[str, torch.Tensor]:
    for name, kind in _WEIGHT_CANDIDATES:
        if (directory / name).is_file():
            break
    else:
        raise ModelLoadError(
            f"{directory} has no weights: expected one of "
            f"{', '.join(name for name, _ in _WEIGHT_CANDIDATES)}"
        )
    if kind.endswith("-index"):
        weight_map = _read_json(directory / name, files).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{directory / name} has no 'weight_map'; the sharded snapshot is corrupted")
        shards = sorted(set(weight_map.values()))
        kind = kind.removesuffix("-index")
    else:
        shards = [name]

    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = directory / shard
        if not path.is_file():
            raise ModelLoadError(f"weight shard {path} is missing; fetch the complete snapshot")
        part = _read_safetensors(path) if kind == "safetensors" else _read_bin(path)
        files[shard] = _sha256(path)
        state.update(part)
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({err}); fetch it again") from err


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for refused globals, RuntimeError/EOFError for corrupt files
        raise ModelLoadError(
            f"refused to load {path}: it is not a plain tensor checkpoint ({_first_line(err)}). "
            "Only weights_only pickles are read, because unpickling can run arbitrary code; "
            "prefer model.safetensors"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a flat dict of tensors (a state dict); it cannot be loaded")
    return state


# --- weights into the model ------------------------------------------------


def _load_state(model: neox.Model, state: dict[str, torch.Tensor], directory: Path) -> None:
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if _LEGACY_BUFFERS.match(key):
            continue
        for pattern, target in _HEAD_RENAMES:
            key = pattern.sub(target, key)
        if key in renamed:
            raise ModelLoadError(f"the weights in {directory} hold {key!r} twice (under its hub and its current name)")
        if not tensor.is_floating_point():
            raise ModelLoadError(f"weight {key!r} in {directory} has dtype {tensor.dtype}; expected floating point")
        renamed[key] = tensor.to(torch.float32)  # fp16 -> fp32 is exact

    expected = set(model.state_dict())
    missing = sorted(expected - renamed.keys())
    unexpected = sorted(renamed.keys() - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"the weights in {directory} do not match the GPT-NeoX model built from its config.json: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}. "
            "Check that config.json belongs to these weights"
        )
    shapes = model.state_dict()
    wrong = [
        f"{k}: file {tuple(v.shape)} vs config {tuple(shapes[k].shape)}"
        for k, v in renamed.items() if v.shape != shapes[k].shape
    ]
    if wrong:
        raise ModelLoadError(
            f"weight shapes in {directory} do not match its config.json: {_few(wrong)}. "
            "Check that config.json belongs to these weights"
        )
    bad = [k for k, v in renamed.items() if not torch.isfinite(v).all()]
    if bad:
        raise ModelLoadError(f"weights in {directory} contain NaN or inf: {_few(bad)}; the checkpoint is corrupted")
    model.load_state_dict(renamed, strict=True)


def _few(items: list[str], limit: int = 5) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _config_summary(config: neox.Config) -> dict:
    rope = config.rope_parameters or {}
    return {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rotary_pct": rope.get("partial_rotary_factor"),
        "rotary_emb_base": rope.get("rope_theta"),
        "use_parallel_residual": config.use_parallel_residual,
        "tie_word_embeddings": config.tie_word_embeddings,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": config.hidden_act,
        "attention_bias": config.attention_bias,
        "stored_dtype": str(config.dtype).removeprefix("torch.") if config.dtype is not None else None,
    }
