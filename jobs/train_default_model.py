"""Train spectro's embedded default model: a tiny GPT-NeoX on the embedded stdlib corpus.

    python jobs/train_default_model.py --out spectro/assets/default_model

Writes, in the Hugging Face hub layout: config.json, model.safetensors (fp16
weights; load with dtype=torch.float32), tokenizer.json, and training.json
(settings, corpus hash, held-out figures, wall time).

Non-obvious choices:

- Tokenizer: byte-level BPE like GPT-NeoX's (NFC normalizer, ByteLevel
  pre-tokenizer without prefix space, ByteLevel post-processor and decoder),
  vocab 4096, ``<|endoftext|>`` = id 0, trained on the train split only.
- Training data: every train-split document is tokenized and the documents are
  joined into one stream with ``<|endoftext|>`` between them; each batch row is
  a 128-token window starting at a uniformly random position, drawn with a
  seeded ``torch.Generator``. Random offsets (rather than aligned windows) give
  many more distinct contexts from a small corpus.
- Weight init uses the global torch RNG (transformers' ``_init_weights`` knows no
  other); it is seeded once, at the start of this process, before the model
  is built. Everything else takes an explicit generator.
- AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear warmup over
  the first 5% of steps, cosine decay to 10% of the peak rate, grad-norm clip 1.
- Evaluation is on the weights as stored (fp16, loaded back as float32), so the
  recorded figures are exactly what a user of the asset gets. Held-out loss is
  the mean next-token cross-entropy (nats) over positions 1..127 of every
  aligned 128-token window of the held-out split; the unigram entropy is the
  cross-entropy of the same targets under train-split token frequencies with
  add-one smoothing (the best context-free predictor). Both are also broken
  down by source, and a 16-context check figure (make_contexts seed 0,
  balanced) is recorded for the tests to reproduce.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

# Run as a script from a checkout: make the repository's `spectro` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spectro import mechanisms
from spectro.data import Corpus, embedded_corpus, make_contexts

VOCAB_SIZE = 4096
SEQ_LEN = 128
EOS = "<|endoftext|>"
CHECK_CONTEXTS = 16  # size of the small held-out check the tests recompute
CHECK_SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    p.add_argument("--out", type=Path, default=Path("spectro/assets/default_model"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250, help="steps between held-out and induction checks")
    p.add_argument("--repeat-share", type=float, default=0.3, help="share of rows holding a repeated span")
    p.add_argument("--random-share", type=float, default=0.3, help="share of repeated spans made of random tokens")
    p.add_argument("--span", type=int, nargs=2, default=(8, 48), metavar=("MIN", "MAX"), help="repeated span length")
    return p.parse_args(argv)


def train_tokenizer(corpus: Corpus) -> Tokenizer:
    """Byte-level BPE with GPT-NeoX's pipeline, vocab VOCAB_SIZE, EOS = id 0."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([d.text for d in corpus.documents], trainer=trainer, length=len(corpus.documents))
    if tok.token_to_id(EOS) != 0 or tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer came out wrong: EOS id {tok.token_to_id(EOS)}, vocab {tok.get_vocab_size()}")
    return tok


def token_stream(corpus: Corpus, tok: Tokenizer) -> torch.Tensor:
    """All documents' tokens joined with EOS between them."""
    eos = tok.token_to_id(EOS)
    parts: list[int] = []
    for enc in tok.encode_batch([d.text for d in corpus.documents], add_special_tokens=False):
        parts.extend(enc.ids)
        parts.append(eos)
    return torch.tensor(parts, dtype=torch.int64)  # (n_tokens,)


def build_config() -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=256,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )


def training_rows(stream: torch.Tensor, batch: int, gen: torch.Generator, repeat_share: float,
                  random_share: float, span: tuple[int, int], vocab: int) -> torch.Tensor:
    """A batch of SEQ_LEN-token rows: natural windows, a share of them carrying a repeated span.

    In a repeat row a span A of L tokens (natural, or uniformly random ids for a
    share of rows) sits at s and a copy overwrites the window at t >= s + L,
    so the tokens of the copy are predictable only by looking back at A.
    """
    offsets = torch.arange(SEQ_LEN)  # (seq_len,)
    starts = torch.randint(0, stream.numel() - SEQ_LEN, (batch,), generator=gen)  # (batch,)
    rows = stream[starts[:, None] + offsets[None, :]].clone()  # (batch, seq_len)
    draws = torch.rand(batch, 2, generator=gen)  # (batch, 2): repeat?, random?
    for r in range(batch):
        if draws[r, 0] >= repeat_share:
            continue
        L = int(torch.randint(span[0], span[1] + 1, (1,), generator=gen))
        s = int(torch.randint(0, SEQ_LEN - 2 * L + 1, (1,), generator=gen))
        t = int(torch.randint(s + L, SEQ_LEN - L + 1, (1,), generator=gen))
        if draws[r, 1] < random_share:
            rows[r, s : s + L] = torch.randint(1, vocab, (L,), generator=gen)
        rows[r, t : t + L] = rows[r, s : s + L]
    return rows


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 5% of steps, then cosine decay to 10% of peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def per_token_nll(model: GPTNeoXForCausalLM, input_ids: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """-log p(x_t | x_<t) for t = 1..seq_len-1 of every row: (n, seq_len - 1)."""
    model.eval()
    out = []
    for chunk in input_ids.split(batch):  # (b, seq_len)
        logits = model(input_ids=chunk).logits[:, :-1].float()  # (b, seq_len-1, vocab)
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), chunk[:, 1:], reduction="none"
        )  # (b, seq_len-1)
        out.append(nll)
    return torch.cat(out)  # (n, seq_len-1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # weight init only; see the module docstring

    train_corpus = embedded_corpus(split="train")
    heldout_corpus = embedded_corpus(split="heldout")
    print(train_corpus.description, flush=True)
    print(heldout_corpus.description, flush=True)

    tok = train_tokenizer(train_corpus)
    stream = token_stream(train_corpus, tok)  # (n_train_tokens,)
    print(f"tokenizer trained ({time.time() - t_start:.0f}s); {stream.numel():,} train tokens", flush=True)

    config = build_config()
    model = GPTNeoXForCausalLM._from_config(config, attn_implementation="eager")
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    # a small fixed check, logged during training: held-out loss and the two induction figures
    watch_held = make_contexts(heldout_corpus, tok, SEQ_LEN, 64, seed=5, max_len=config.max_position_embeddings,
                               balance_sources=False).input_ids
    watch_nat = make_contexts(heldout_corpus, tok, 40, 64, seed=6).input_ids
    watch_rand = mechanisms.random_passages(64, 40, VOCAB_SIZE, seed=7)
    history = []

    def watch(step: int) -> None:
        row = {"step": step, "heldout_loss": round(float(mechanisms.token_nll(model, watch_held).mean()), 4),
               "induction_natural": round(mechanisms.induction_figure(model, watch_nat)["drop"], 4),
               "induction_random": round(mechanisms.induction_figure(model, watch_rand)["drop"], 4)}
        history.append(row)
        print("check", json.dumps(row), flush=True)

    model.train()
    t_train = time.time()
    for step in range(args.steps):
        batch = training_rows(stream, args.batch, data_gen, args.repeat_share, args.random_share, tuple(args.span),
                              VOCAB_SIZE)  # (batch, seq_len)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.time() - t_train
            rate = (step + 1) * args.batch * SEQ_LEN / elapsed
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {group['lr']:.2e}  {rate:,.0f} tok/s  {elapsed:.0f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            watch(step + 1)
    train_seconds = time.time() - t_train

    # Write the asset, then evaluate the weights exactly as stored.
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.to(torch.float16).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    stored = GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    stored_tok = Tokenizer.from_file(str(out / "tokenizer.json"))

    # Held-out: every aligned window of the held-out split.
    encs = stored_tok.encode_batch([d.text for d in heldout_corpus.documents], add_special_tokens=False)
    n_windows = sum(len(e.ids) // SEQ_LEN for e in encs)
    heldout = make_contexts(
        heldout_corpus, stored_tok, SEQ_LEN, n_windows, seed=0, max_len=config.max_position_embeddings, balance_sources=False
    )
    nll = per_token_nll(stored, heldout.input_ids)  # (n_windows, seq_len-1)

    counts = torch.bincount(stream, minlength=VOCAB_SIZE).double()  # (vocab,)
    log_unigram = torch.log((counts + 1) / (counts.sum() + VOCAB_SIZE))  # (vocab,)
    unigram_nll = -log_unigram[heldout.input_ids[:, 1:]]  # (n_windows, seq_len-1)

    by_source = {}
    src = np.array(heldout.sources)
    for s in sorted(set(heldout.sources)):
        rows = torch.from_numpy(np.flatnonzero(src == s))
        by_source[s] = {
            "contexts": int(rows.numel()),
            "loss": float(nll[rows].mean()),
            "unigram_entropy": float(unigram_nll[rows].mean()),
        }

    check = make_contexts(
        heldout_corpus, stored_tok, SEQ_LEN, CHECK_CONTEXTS, seed=CHECK_SEED, max_len=config.max_position_embeddings
    )
    check_loss = float(per_token_nll(stored, check.input_ids).mean())

    mech = mechanisms.measure(stored, stored_tok, heldout_corpus, heldout.input_ids[:256])

    record = {
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": SEQ_LEN,
        "lr": args.lr,
        "schedule": "AdamW(0.9, 0.95, wd 0.1 on matrices), 5% linear warmup, cosine to 10%, clip 1.0",
        "threads": args.threads,
        "n_parameters": n_params,
        "stored_dtype": "float16",
        "corpus_content_hash": train_corpus.content_hash,
        "corpus_description": train_corpus.description,
        "heldout_content_hash": heldout_corpus.content_hash,
        "heldout_description": heldout_corpus.description,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "train_tokens": int(stream.numel()),
        "heldout_tokens": int(sum(len(e.ids) for e in encs)),
        "heldout_eval_contexts": int(n_windows),
        "heldout_loss": float(nll.mean()),
        "unigram_entropy": float(unigram_nll.mean()),
        "heldout_by_source": by_source,
        "check": {"n_contexts": CHECK_CONTEXTS, "seed": CHECK_SEED, "balance_sources": True, "loss": check_loss},
        "mechanisms": mech,
        "history": history,
        "train_wall_seconds": round(train_seconds, 1),
        "total_wall_seconds": round(time.time() - t_start, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(json.dumps({k: record[k] for k in ("heldout_loss", "unigram_entropy", "heldout_by_source", "check")}, indent=2))
    print(json.dumps({k: v for k, v in mech.items() if k != "ablation"}, indent=2))
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {record['total_wall_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
