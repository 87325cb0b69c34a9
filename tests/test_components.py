"""spectro.components: names, masks, and what each mask actually moves.

The mask tests are behavioural: perturb exactly the masked entries of a real
(tiny, random, eager, float32) GPT-NeoX and watch the model's own intermediate
tensors through forward hooks. `attention.dense`'s input, viewed as
(batch, seq, heads, head_dim), is the per-head attention output; the residual
stream entering each layer shows where a change starts.
"""

import copy
import re

import pytest
import torch
import transformers

from spectro.components import Component, all_component_names, resolve_components
from spectro.errors import ComponentError
from spectro.model import load_model
from tests.pythia_fixture import PYTHIA14M_CONFIG, TINY_CONFIG, make_tiny_checkpoint

N_LAYERS, N_HEADS, HIDDEN = 2, 4, 32
HEAD_DIM = HIDDEN // N_HEADS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> transformers.GPTNeoXForCausalLM:
    model = load_model(str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1))).model
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (N_LAYERS, N_HEADS, HIDDEN)
    assert cfg._attn_implementation == "eager" and next(model.parameters()).dtype == torch.float32
    return model


IDS = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2]])  # (batch=2, seq=8)


def trace(model) -> dict[str, torch.Tensor]:
    """Run IDS through `model`; return per-head attention outputs, attention outputs, the
    residual stream entering each layer and entering the final norm, and the logits."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.gpt_neox.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(f"stream{i}", args[0].clone())))
        hooks.append(layer.attention.dense.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(          # (batch, seq, hidden) -> (batch, seq, heads, head_dim)
                f"heads{i}", args[0].reshape(*args[0].shape[:2], N_HEADS, HEAD_DIM).clone())))
        hooks.append(layer.attention.dense.register_forward_hook(
            lambda mod, args, out, i=i: seen.__setitem__(f"attn{i}", out.clone())))
    hooks.append(model.gpt_neox.final_layer_norm.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__(f"stream{N_LAYERS}", args[0].clone())))
    try:
        with torch.no_grad():
            seen["logits"] = model(IDS).logits                # (batch, seq, vocab)
    finally:
        for h in hooks:
            h.remove()
    return seen


def perturbed(model, masks: dict[str, torch.Tensor | None], *, complement: bool = False, seed: int = 0):
    """A copy of `model` with N(0, 0.1^2) added to the masked entries (or to every other
    entry of the same tensors, with `complement`)."""
    other = copy.deepcopy(model)
    params = dict(other.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            where = torch.ones_like(p, dtype=torch.bool) if mask is None else mask
            if complement:
                where = ~where
            p += torch.where(where, 0.1 * torch.randn(p.shape, generator=gen), torch.zeros_like(p))
    return other


# --- names -----------------------------------------------------------------


def test_canonical_names_for_the_pythia14m_shape():
    config = transformers.GPTNeoXConfig.from_dict(PYTHIA14M_CONFIG)
    names = all_component_names(config)
    expected = ["embed"]
    for i in range(6):
        expected += [f"l{i}h0", f"l{i}h1", f"l{i}h2", f"l{i}h3", f"l{i}.mlp"]
    expected.append("unembed")
    assert names == expected and len(names) == 32


def test_groups_single_names_and_order(tiny):
    names = lambda spec: [c.name for c in resolve_components(tiny, spec)]
    assert names("all") == ["embed", "l0h0", "l0h1", "l0h2", "l0h3", "l0.mlp",
                            "l1h0", "l1h1", "l1h2", "l1h3", "l1.mlp", "unembed"]
    assert names("heads") == [f"l{i}h{j}" for i in range(2) for j in range(4)]
    assert names("mlps") == ["l0.mlp", "l1.mlp"]
    assert names("l1h2") == ["l1h2"]
    assert names(["unembed", "mlps", "full"]) == ["unembed", "l0.mlp", "l1.mlp", "full"]
    assert "full" not in names("all")


def test_unknown_and_duplicate_names_are_refused(tiny):
    with pytest.raises(ComponentError, match=re.escape(
            "unknown component 'l2h0'. Valid names for this model: 'embed', 'unembed', 'full', "
            "'l{i}h{j}' (heads, i in 0..1, j in 0..3), 'l{i}.mlp' (MLPs, i in 0..1), "
            "and the groups 'all', 'heads', 'mlps'.")):
        resolve_components(tiny, ["l0h1", "l2h0"])
    with pytest.raises(ComponentError, match=r"unknown component 'l0\.h1'.*Did you mean 'l0h1'"):
        resolve_components(tiny, "l0.h1")
    with pytest.raises(ComponentError, match=r"component\(s\) \['l0h1'\] requested more than once \(after "
                                             r"expanding the groups in \['heads', 'l0h1'\]\); list each component once"):
        resolve_components(tiny, ["heads", "l0h1"])
    with pytest.raises(ComponentError, match=r"component\(s\) \['embed'\] requested more than once"):
        resolve_components(tiny, ["embed", "embed"])
    with pytest.raises(ComponentError, match=r"no components given"):
        resolve_components(tiny, [])


def test_tied_model_has_no_unembed_component():
    config = transformers.GPTNeoXConfig.from_dict({**TINY_CONFIG, "tie_word_embeddings": True})
    model = transformers.GPTNeoXForCausalLM(config)
    with pytest.raises(ComponentError, match=r"the model has no parameter 'lm_head\.weight'; components are "
                                             r"defined for transformers' GPTNeoXForCausalLM with untied embeddings"):
        resolve_components(model, ["unembed"])


# --- masks: which tensors, how many entries ----------------------------------


def test_mask_contents_and_counts(tiny):
    comps = {c.name: c for c in resolve_components(tiny, ["l1h2", "l0.mlp", "embed", "unembed", "full"])}
    params = dict(tiny.named_parameters())

    head = comps["l1h2"]
    p = "gpt_neox.layers.1.attention."
    assert set(head.masks) == {p + "query_key_value.weight", p + "query_key_value.bias", p + "dense.weight"}
    qkv_rows = head.masks[p + "query_key_value.weight"].all(dim=1)            # (3*hidden,)
    assert qkv_rows.nonzero().flatten().tolist() == list(range(48, 72))       # 3*2*8 .. 3*3*8
    assert not head.masks[p + "query_key_value.weight"][~qkv_rows].any()
    assert torch.equal(head.masks[p + "query_key_value.bias"], qkv_rows)
    dense_cols = head.masks[p + "dense.weight"].all(dim=0)                    # (hidden,) input columns
    assert dense_cols.nonzero().flatten().tolist() == list(range(16, 24))
    assert not head.masks[p + "dense.weight"][:, ~dense_cols].any()
    assert head.n_parameters == 24 * 32 + 24 + 32 * 8 == 1048
    assert head.layer == 1
    for name, mask in head.masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape == head.shapes[name]

    mlp = comps["l0.mlp"]
    q = "gpt_neox.layers.0.mlp."
    assert mlp.masks == {q + "dense_h_to_4h.weight": None, q + "dense_h_to_4h.bias": None,
                         q + "dense_4h_to_h.weight": None, q + "dense_4h_to_h.bias": None}
    assert mlp.n_parameters == 64 * 32 + 64 + 32 * 64 + 32 == 4192 and mlp.layer == 0

    assert comps["embed"].masks == {"gpt_neox.embed_in.weight": None}
    assert comps["embed"].n_parameters == 64 * 32 and comps["embed"].layer == 0
    assert comps["unembed"].masks == {"lm_head.weight": None}
    assert comps["unembed"].n_parameters == 64 * 32 and comps["unembed"].layer == 2

    full = comps["full"]
    assert full.masks == {name: None for name in params} and full.layer == 0
    assert full.n_parameters == sum(x.numel() for x in params.values()) == 21248


def _coverage(model, components: list[Component]) -> dict[str, torch.Tensor]:
    """How many components (plus LayerNorms and the shared attention.dense.bias) own each entry."""
    params = dict(model.named_parameters())
    count = {n: torch.zeros(p.shape, dtype=torch.int64) for n, p in params.items()}
    for comp in components:
        for name, mask in comp.masks.items():
            count[name] += 1 if mask is None else mask.long()
    for name in params:
        if re.search(r"layernorm\.|final_layer_norm\.|attention\.dense\.bias$", name):
            count[name] += 1
    return count


def test_components_layernorms_and_dense_biases_partition_the_parameters(tiny):
    count = _coverage(tiny, resolve_components(tiny, "all"))
    assert all(bool((c == 1).all()) for c in count.values())
    assert sum(c.numel() for c in count.values()) == 21248


def test_pythia14m_shape_partition_counts():
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig.from_dict(PYTHIA14M_CONFIG))
    comps = resolve_components(model, "all")
    sizes = {c.name: c.n_parameters for c in comps}
    assert len(comps) == 32
    assert {sizes[f"l{i}h{j}"] for i in range(6) for j in range(4)} == {3 * 32 * 128 + 3 * 32 + 128 * 32} == {16480}
    assert {sizes[f"l{i}.mlp"] for i in range(6)} == {131712}
    assert sizes["embed"] == sizes["unembed"] == 50304 * 128 == 6438912
    layernorms, dense_biases = 6 * 4 * 128 + 2 * 128, 6 * 128
    assert sum(sizes.values()) + layernorms + dense_biases == 14_067_712
    count = _coverage(model, comps)
    assert all(bool((c == 1).all()) for c in count.values())


# --- masks: what they move ---------------------------------------------------


@pytest.mark.parametrize("layer,head", [(i, j) for i in range(N_LAYERS) for j in range(N_HEADS)])
def test_a_head_mask_moves_only_that_head(tiny, layer, head):
    (comp,) = resolve_components(tiny, f"l{layer}h{head}")
    base = trace(tiny)
    moved = trace(perturbed(tiny, comp.masks))
    for i in range(layer):                                       # layers below: bit-identical
        assert torch.equal(moved[f"heads{i}"], base[f"heads{i}"])
        assert torch.equal(moved[f"attn{i}"], base[f"attn{i}"])
    assert torch.equal(moved[f"stream{layer}"], base[f"stream{layer}"])
    for j in range(N_HEADS):                                     # in the layer: only this head's output moves
        same = torch.equal(moved[f"heads{layer}"][:, :, j], base[f"heads{layer}"][:, :, j])
        assert same == (j != head), j
    assert (moved[f"heads{layer}"][:, :, head] - base[f"heads{layer}"][:, :, head]).abs().max() > 1e-3
    assert (moved[f"attn{layer}"] - base[f"attn{layer}"]).abs().max() > 1e-3

    # The dense columns in the mask read exactly this head's output: moving them alone shifts
    # the attention output by heads[..., head, :] @ delta[:, cols].T.
    dense = f"gpt_neox.layers.{layer}.attention.dense.weight"
    only_dense = perturbed(tiny, {dense: comp.masks[dense]})
    delta = dict(only_dense.named_parameters())[dense] - dict(tiny.named_parameters())[dense]  # (hidden, hidden)
    cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    assert delta[:, cols].abs().min() > 0 and not delta[:, ~comp.masks[dense].all(dim=0)].any()
    expected = base[f"heads{layer}"][:, :, head] @ delta[:, cols].T             # (batch, seq, hidden)
    torch.testing.assert_close(trace(only_dense)[f"attn{layer}"] - base[f"attn{layer}"], expected,
                               rtol=0, atol=1e-5)

    # Every other entry of the same three tensors: this head's output does not move, the others do.
    rest = trace(perturbed(tiny, comp.masks, complement=True))
    for j in range(N_HEADS):
        same = torch.equal(rest[f"heads{layer}"][:, :, j], base[f"heads{layer}"][:, :, j])
        assert same == (j == head), j


def test_each_component_changes_the_model_from_its_layer_on(tiny):
    """`layer` is where a change starts. Index the stream S = [input to layer 0 (the embedding),
    output of layer 0, ..., output of layer L-1, logits]: the first entry a component moves is
    0 for embed and layer + 1 otherwise; everything after it moves too."""
    base = trace(tiny)
    keys = [f"stream{k}" for k in range(N_LAYERS + 1)] + ["logits"]
    for comp in resolve_components(tiny, ["all", "full"]):
        moved = trace(perturbed(tiny, comp.masks))
        changed = [not torch.equal(moved[k], base[k]) for k in keys]
        first = changed.index(True)
        assert first == (0 if comp.name in ("embed", "full") else comp.layer + 1), comp.name
        assert all(changed[first:]), comp.name
        in_layer = re.match(r"^l(\d+)", comp.name)
        assert comp.layer == (int(in_layer.group(1)) if in_layer else {"embed": 0, "full": 0, "unembed": N_LAYERS}[comp.name])
