"""Mechanisms of a model measured without susceptibilities: the known answers a
spectroscope should find.

    from spectro.mechanisms import induction_figure, previous_token_scores, head_ablation_table
    fig = induction_figure(model, passages)            # nats the loss drops on a repeat
    table = head_ablation_table(model, passages, heldout_ids)

- **Induction** (in-context copying): a passage A of L tokens is followed by
  itself, [A, A]. The figure is the mean, over A's tokens 1..L-1, of the loss
  at the first occurrence minus the loss at the second: how many nats the
  model gains from having seen the passage. A model that copies from its
  context gains several nats; one that does not gains little. Measured on
  held-out natural passages and on uniformly random tokens (where nothing but
  copying can help).
- **Attention scores** per head on random repeated tokens: the *induction
  score* is the mean attention from a second-occurrence token at position t
  to position t - L + 1 (the token after the previous occurrence of the
  current token); the *previous-token score* is the mean attention from every
  position t >= 1 to t - 1 on natural text.
- **Ablation** per head: zero that head's output (its slice of the input of
  the attention's output projection) and measure the induction figures and
  the held-out loss again. A head carries induction when zeroing it costs a
  large share of the figure.

Non-obvious choices:
- Ablation is by a forward pre-hook on ``attention.dense`` that zeroes the
  head's ``head_dim`` input columns (the layout `spectro.neox` documents), so
  the bias of the projection and every other head stay as they are.
- Random passages draw ids uniformly from ``[1, vocab)`` (id 0 is the
  end-of-text token) with an explicit ``torch.Generator``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from spectro import neox
from spectro.data import Corpus, make_contexts


@dataclass(frozen=True)
class HeadScores:
    name: str                    # "l{i}h{j}"
    induction_score: float       # attention to the token after the previous occurrence (random repeats)
    previous_token_score: float  # attention to the previous position (natural text)


def repeated(passages: torch.Tensor) -> torch.Tensor:
    """(n, L) passages -> (n, 2L) rows [A, A]."""
    return torch.cat([passages, passages], dim=1)  # (n, 2L)


def random_passages(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """(n, length) uniform token ids in [1, vocab), deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=gen)  # (n, length)


@torch.no_grad()
def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """-log p(x_t | x_<t) for t = 1..T-1 of every row: (n, T - 1), float32."""
    was = model.training
    model.eval()
    out = []
    for chunk in input_ids.split(batch):  # (b, T)
        logits = model(input_ids=chunk).logits[:, :-1].float()  # (b, T-1, vocab)
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none"))
    model.train(was)
    return torch.cat(out)  # (n, T-1)


def induction_figure(model: torch.nn.Module, passages: torch.Tensor) -> dict[str, float]:
    """Loss on A's tokens 1..L-1 at the first and at the second occurrence of [A, A], and their difference."""
    L = passages.shape[1]
    nll = token_nll(model, repeated(passages))  # (n, 2L-1): target t+1 at column t
    first = nll[:, : L - 1]                     # targets A[1..L-1], first occurrence
    second = nll[:, L:]                         # targets A[1..L-1], second occurrence
    return {"first": float(first.mean()), "repeat": float(second.mean()),
            "drop": float(first.mean() - second.mean())}


def head_names(model: torch.nn.Module) -> list[str]:
    cfg = model.config
    return [f"l{i}h{j}" for i in range(cfg.num_hidden_layers) for j in range(cfg.num_attention_heads)]


@contextmanager
def ablated(model: torch.nn.Module, heads: list[str]):
    """Zero the output of the named heads ("l{i}h{j}") inside the block."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    by_layer: dict[int, list[int]] = {}
    for name in heads:
        i, j = name[1:].split("h")
        by_layer.setdefault(int(i), []).append(int(j))
    handles = []
    for i, js in by_layer.items():
        cols = torch.zeros(model.config.hidden_size, dtype=torch.bool)
        for j in js:
            cols[neox.head_output_cols(j, head_dim)] = True

        def hook(_module, args, cols=cols):
            (x,) = args  # (b, T, hidden): the heads' outputs side by side
            return (x.masked_fill(cols, 0.0),)

        handles.append(neox.layers(model)[i].attention.dense.register_forward_pre_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def attention_scores(model: torch.nn.Module, random_rows: torch.Tensor, natural: torch.Tensor,
                     batch: int = 32) -> list[HeadScores]:
    """Per head: induction score on random [A, A] rows, previous-token score on natural rows."""
    L = random_rows.shape[1]
    rows = repeated(random_rows)  # (n, 2L)
    ind_sum = torch.zeros(model.config.num_hidden_layers, model.config.num_attention_heads, dtype=torch.float64)
    prev_sum = torch.zeros_like(ind_sum)
    t = torch.arange(L + 1, 2 * L)  # (L-1,) second-occurrence positions that have a predecessor pattern
    for chunk in rows.split(batch):
        att = model(input_ids=chunk, output_attentions=True).attentions  # layers x (b, heads, 2L, 2L)
        for i, a in enumerate(att):
            ind_sum[i] += a[:, :, t, t - L + 1].double().mean(dim=(0, 2)) * chunk.shape[0]
    for chunk in natural.split(batch):
        T = chunk.shape[1]
        s = torch.arange(1, T)
        att = model(input_ids=chunk, output_attentions=True).attentions
        for i, a in enumerate(att):
            prev_sum[i] += a[:, :, s, s - 1].double().mean(dim=(0, 2)) * chunk.shape[0]
    ind = ind_sum / rows.shape[0]
    prev = prev_sum / natural.shape[0]
    names = head_names(model)
    nh = model.config.num_attention_heads
    return [HeadScores(n, float(ind[k // nh, k % nh]), float(prev[k // nh, k % nh])) for k, n in enumerate(names)]


def head_ablation_table(model: torch.nn.Module, natural_passages: torch.Tensor, random_rows: torch.Tensor,
                        heldout: torch.Tensor) -> dict:
    """Per head: induction figures and held-out loss with that head zeroed, beside the intact model's."""
    def measure() -> dict[str, float]:
        return {"induction_natural": induction_figure(model, natural_passages)["drop"],
                "induction_random": induction_figure(model, random_rows)["drop"],
                "heldout_loss": float(token_nll(model, heldout).mean())}

    base = measure()
    scores = {s.name: s for s in attention_scores(model, random_rows, heldout)}
    rows = []
    for name in head_names(model):
        with ablated(model, [name]):
            m = measure()
        rows.append({
            "head": name,
            "induction_score": round(scores[name].induction_score, 4),
            "previous_token_score": round(scores[name].previous_token_score, 4),
            "induction_natural_drop": round(base["induction_natural"] - m["induction_natural"], 4),
            "induction_random_drop": round(base["induction_random"] - m["induction_random"], 4),
            "heldout_loss_rise": round(m["heldout_loss"] - base["heldout_loss"], 4),
        })
    return {"intact": {k: round(v, 4) for k, v in base.items()}, "heads": rows}


# A head carries induction when zeroing it costs at least this share of the intact model's random-token figure;
# it is a previous-token head when at least this share of its attention goes to the previous position.
INDUCTION_SHARE = 0.2
PREVIOUS_TOKEN_SCORE = 0.5


def named_heads(table: dict) -> dict[str, list[str]]:
    """The heads an ablation table names: induction heads and previous-token heads."""
    base = table["intact"]["induction_random"]
    ind = [r["head"] for r in table["heads"] if base > 0 and r["induction_random_drop"] >= INDUCTION_SHARE * base]
    prev = [r["head"] for r in table["heads"] if r["previous_token_score"] >= PREVIOUS_TOKEN_SCORE]
    return {"induction_heads": ind, "previous_token_heads": prev}


# The passages every recorded induction figure is measured on (training.json, tests): held-out natural text and
# uniform random ids, 200 passages of 40 tokens each.
PASSAGES = {"n": 200, "length": 40, "natural_seed": 1, "random_seed": 2}


def standard_passages(tokenizer, vocab: int, heldout: Corpus) -> tuple[torch.Tensor, torch.Tensor]:
    """(natural, random) passages, each (200, 40): `PASSAGES` cut from the held-out corpus and drawn uniformly."""
    p = PASSAGES
    natural = make_contexts(heldout, tokenizer, p["length"], p["n"], seed=p["natural_seed"]).input_ids
    return natural, random_passages(p["n"], p["length"], vocab, seed=p["random_seed"])


def measure(model: torch.nn.Module, tokenizer, heldout: Corpus, heldout_ids: torch.Tensor) -> dict:
    """Induction figures on the standard passages, the heads the ablation names, and the ablation table
    (`heldout_ids`: (n, T) held-out windows for the loss column of the table)."""
    natural, rand = standard_passages(tokenizer, model.config.vocab_size, heldout)
    table = head_ablation_table(model, natural, rand, heldout_ids)
    return {"passages": dict(PASSAGES, natural="held-out split, make_contexts(balanced)",
                             random="uniform ids in [1, vocab)"),
            "induction_natural": induction_figure(model, natural), "induction_random": induction_figure(model, rand),
            **named_heads(table), "ablation": table}
