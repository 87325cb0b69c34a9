"""The GPT-NeoX adapter: everything spectro knows about transformers'
`GPTNeoXForCausalLM` (the Pythia models) that is not plain `torch.nn`.

The other modules reach the architecture only through here: the model and
config classes and their names in a snapshot (`spectro.model`), parameter
names (`spectro.components`), the backbone's parts and how to run its
layers from a cached residual stream (`spectro.observables`), and the
module whose output is an SAE site (`spectro.sae.activations`). Supporting
another architecture means another adapter with these names.

Non-obvious choices:
- Fused QKV layout, verified against transformers 5.23's
  ``GPTNeoXAttention.forward``: ``query_key_value(x)`` (3*hidden outputs) is
  ``.view(batch, seq, n_heads, 3 * head_dim)`` and then split with
  ``.chunk(3, dim=-1)`` into q, k, v. So the outputs are interleaved per head,
  ``[head0 q | head0 k | head0 v | head1 q | ...]``, each block ``head_dim``
  long: head j owns rows ``[3*j*head_dim, 3*(j+1)*head_dim)`` of the weight
  (and the same entries of the bias), *not* ``[all q | all k | all v]``.
  The attention output is transposed back to (batch, seq, heads, head_dim) and
  reshaped to (batch, seq, hidden) before ``dense``, so head j feeds columns
  ``[j*head_dim, (j+1)*head_dim)`` of ``attention.dense.weight``.
  ``tests/test_components.py`` checks this behaviourally (through
  ``spectro.components``).
- `run_layers` builds the causal mask and the rotary embeddings exactly as
  `GPTNeoXModel.forward` does (a test checks the body run from a cached
  residual against the full forward to float tolerance).
- Functions take the causal LM and reach its parts by attribute at call
  time, so `torch.func.functional_call` substitutions of parameters named
  from the LM (`gpt_neox.layers.3.mlp...`) are seen.
"""

from __future__ import annotations

import inspect
import re

import torch
import transformers
from transformers.masking_utils import create_causal_mask

ARCHITECTURE = "GPTNeoXForCausalLM"           # `architectures` in a snapshot's config.json
MODEL_TYPE = "gpt_neox"                       # `model_type` in a snapshot's config.json
Model = transformers.GPTNeoXForCausalLM
Config = transformers.GPTNeoXConfig

LAYER_PREFIX = "gpt_neox.layers.{i}."         # parameter names of layer i start with this
EMBED_PARAM = "gpt_neox.embed_in.weight"
UNEMBED_PARAM = "lm_head.weight"
# hub Pythia files call the head `embed_out`; transformers calls it `lm_head`
HEAD_RENAMES = ((re.compile(r"^embed_out\."), "lm_head."),)
# buffers of older checkpoints that current transformers computes itself
LEGACY_BUFFERS = re.compile(r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")

# transformers renamed create_causal_mask's `past_key_values` to `cache` (the old name warns, then goes away)
_NO_CACHE = ({"cache": None} if "cache" in inspect.signature(create_causal_mask).parameters
             else {"past_key_values": None})


def mlp_params(i: int) -> list[str]:
    """The parameters of layer i's MLP (all of them belong to it)."""
    prefix = LAYER_PREFIX.format(i=i) + "mlp."
    return [prefix + s for s in ("dense_h_to_4h.weight", "dense_h_to_4h.bias",
                                 "dense_4h_to_h.weight", "dense_4h_to_h.bias")]


def attention_params(i: int) -> tuple[str, str, str]:
    """Layer i's fused QKV weight and bias and its output projection's weight (the heads' share of them)."""
    prefix = LAYER_PREFIX.format(i=i) + "attention."
    return prefix + "query_key_value.weight", prefix + "query_key_value.bias", prefix + "dense.weight"


def head_qkv_rows(j: int, head_dim: int) -> slice:
    """Rows of the fused QKV weight (and entries of its bias) that head j owns: its q, k, v blocks, contiguous."""
    return slice(3 * j * head_dim, 3 * (j + 1) * head_dim)


def head_output_cols(j: int, head_dim: int) -> slice:
    """Columns of the output projection's weight that head j's output feeds."""
    return slice(j * head_dim, (j + 1) * head_dim)


def config_from_dict(raw: dict) -> transformers.GPTNeoXConfig:
    """The model config of a snapshot's config.json (transformers' errors pass through)."""
    return Config.from_dict(raw)


def build(config: transformers.GPTNeoXConfig) -> transformers.GPTNeoXForCausalLM:
    """A randomly initialised model of `config` (the caller loads the weights)."""
    return Model(config)


def is_neox(model: torch.nn.Module) -> bool:
    """A GPT-NeoX causal LM whose head has no bias (the fused head + cross-entropy applies)."""
    return hasattr(model, "gpt_neox") and hasattr(model, "lm_head") and getattr(model.lm_head, "bias", None) is None


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without the head (`GPTNeoXModel`)."""
    return model.gpt_neox


def layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's transformer blocks, in order."""
    return model.gpt_neox.layers


def mlp(block: torch.nn.Module) -> torch.nn.Module:
    """The MLP of one block (its output is added to the residual stream)."""
    return block.mlp


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) ids -> (batch, seq, hidden) final hidden states, after the final LayerNorm."""
    return model.gpt_neox(input_ids=input_ids, use_cache=False).last_hidden_state


def embed(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) ids -> (batch, seq, hidden) residual stream entering layer 0."""
    return model.gpt_neox.embed_in(input_ids)


def run_layers(model: torch.nn.Module, hidden: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    """The residual stream entering layer `start` -> the one leaving layer `stop - 1` (all layers: None)."""
    base = model.gpt_neox
    pos = torch.arange(hidden.shape[-2], device=hidden.device).unsqueeze(0)          # (1, seq)
    mask = create_causal_mask(config=base.config, inputs_embeds=hidden, attention_mask=None, position_ids=pos,
                              **_NO_CACHE)
    rot = base.rotary_emb(hidden, position_ids=pos)
    for blk in base.layers[start:stop]:
        hidden = blk(hidden, attention_mask=mask, position_ids=pos, position_embeddings=rot)
    return hidden


def final_norm(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The final LayerNorm applied to the residual stream leaving the last layer."""
    return model.gpt_neox.final_layer_norm(hidden)
