"""What an honest-but-curious server learns from the hidden states it is sent.

CurveZMQ protects the wire, not the server's side: the server receives each
client's cut-K1 hidden state in clear, and it holds the same checkpoint as the
client (hello compares their fingerprints), so it knows the public embedding
table and can compute hidden states at any cut for any text it likes. This
measures, on the built-in all-MiniLM-L6-v2 and the built-in data, how many
input tokens such a server recovers from the hidden state at each cut:

- nearest neighbour: each position's hidden state against the word-embedding
  table, by cosine similarity and by L2 distance (nothing learned);
- linear inversion: a ridge regression from hidden states to the embedding of
  the token at the same position, decoded by cosine nearest neighbour, fit on
  the hidden states of public text the server computes itself: once on the
  built-in training docstrings (text like the clients'), once on random token
  sequences (no data at all); scored on the held-out test docstrings, which
  no fit saw.

Accuracy counts every position that is not padding, and separately the
positions that are not special tokens ([CLS], [SEP]). The hidden state at cut
K is the input of block K in the client segment, what a client with ``--cut
K,K2`` sends; LoRA starts at zero, so this is the frozen model's, as in a
client's first step. Prints a Markdown table and writes the figures as JSON.

    python bench/privacy.py [--cuts 1,2,3] [--out bench/privacy.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.data import load_dataset  # noqa: E402
from edge.tokenizer import load_tokenizer  # noqa: E402
from split.partition import CLIENT, Cut, build_segment, load_config, resolve_model_path  # noqa: E402

NUM_LABELS = 10  # the built-in task's classes; the head is never reached
BATCH = 64
RIDGE = 1e-3  # ridge penalty relative to the mean diagonal of X'X; fixed, never tuned on the test texts
ATTACKS = {
    "nn_cosine": "nearest neighbour, cosine",
    "nn_l2": "nearest neighbour, L2",
    "linear_docstrings": "linear inversion fit on public docstrings",
    "linear_random": "linear inversion fit on random tokens",
}


class _Captured(Exception):
    """Ends a forward pass once the deepest hidden state is captured: nothing past the cut is needed."""


def client_hidden_states(cuts: list[int], batches: list[dict]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The hidden state each cut sends, at every non-padding position of
    ``batches``, and the token ids there. One pass through the client segment
    of the deepest cut: the input of its block K is what a cut-K client sends
    (checked against each cut's own segment on the first batch)."""
    deepest = max(cuts)
    segment = build_segment(None, CLIENT, Cut(deepest, 1), num_labels=NUM_LABELS, dropout=False)
    segment.model.eval()
    seen: dict[int, torch.Tensor] = {}
    for k in cuts:
        segment.blocks()[k].register_forward_pre_hook(_capture(seen, k, stop=k == deepest), with_kwargs=True)
    hidden: dict[int, list[torch.Tensor]] = {k: [] for k in cuts}
    tokens = []
    for batch in batches:
        _run(segment, batch)
        mask = batch["attention_mask"].bool()
        for k in cuts:
            hidden[k].append(seen[k][mask])
        tokens.append(batch["input_ids"][mask])
    for k in cuts:  # each cut's own client segment sends the same tensor
        own = build_segment(None, CLIENT, Cut(k, 1), num_labels=NUM_LABELS, dropout=False)
        own.model.eval()
        mine: dict[int, torch.Tensor] = {}
        own.blocks()[k].register_forward_pre_hook(_capture(mine, k, stop=True), with_kwargs=True)
        _run(own, batches[0])
        first = batches[0]["attention_mask"].bool()
        assert torch.equal(mine[k][first], hidden[k][0]), f"cut {k}: the shared pass differs from the cut's segment"
    return {k: torch.cat(v) for k, v in hidden.items()}, torch.cat(tokens)


def _capture(store: dict, k: int, stop: bool):
    def hook(module, args, kwargs):
        store[k] = (args[0] if args else kwargs["hidden_states"]).detach()
        if stop:
            raise _Captured

    return hook


@torch.no_grad()
def _run(segment, batch: dict) -> None:
    try:
        segment.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except _Captured:
        pass


def text_batches(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    return [dict(tokenizer(texts[i:i + BATCH], truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt")) for i in range(0, len(texts), BATCH)]


def random_batches(tokenizer, count: int, length: int, seed: int) -> list[dict]:
    """[CLS] + ``length`` random non-special tokens + [SEP]: public text that needs no data."""
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor(tokenizer.all_special_ids)
    pool = torch.arange(len(tokenizer))
    pool = pool[~torch.isin(pool, special)]
    batches = []
    for start in range(0, count, BATCH):
        n = min(BATCH, count - start)
        body = pool[torch.randint(len(pool), (n, length), generator=gen)]
        cls, sep = torch.full((n, 1), tokenizer.cls_token_id), torch.full((n, 1), tokenizer.sep_token_id)
        ids = torch.cat([cls, body, sep], 1)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def nearest(queries: torch.Tensor, table: torch.Tensor, metric: str) -> torch.Tensor:
    """For each query row, the index of the nearest table row."""
    if metric == "cosine":
        unit = F.normalize(table, dim=1)
        return torch.cat([(F.normalize(q, dim=1) @ unit.T).argmax(1) for q in queries.split(4096)])
    squared = (table * table).sum(1)  # |q - e|^2 = |q|^2 - 2 q.e + |e|^2, and |q|^2 is the same for every e
    return torch.cat([(squared[None] - 2 * q @ table.T).argmin(1) for q in queries.split(4096)])


def fit_linear(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Ridge regression (with a bias) from hidden states to target vectors."""
    x = _with_bias(hidden).double()
    gram = x.T @ x
    penalty = RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + penalty, x.T @ targets.double()).float()


def _with_bias(hidden: torch.Tensor) -> torch.Tensor:
    return torch.cat([hidden, torch.ones(len(hidden), 1)], 1)


def accuracy(predicted: torch.Tensor, tokens: torch.Tensor, special: torch.Tensor) -> dict:
    hit = predicted == tokens
    words = ~torch.isin(tokens, special)
    return {"all": hit.float().mean().item(), "words": hit[words].float().mean().item(),
            "positions": len(tokens), "word_positions": int(words.sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", default="1,2,3", help="client blocks K1 to measure, comma-separated")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (the client's default)")
    parser.add_argument("--random-texts", type=int, default=1000, help="random token sequences for the linear fit")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default=str(Path(__file__).with_name("privacy.json")), help="JSON of the figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuts = sorted({int(c) for c in args.cuts.split(",")})
    started = time.perf_counter()

    path = resolve_model_path(None)
    config = load_config(path, "classification", NUM_LABELS, dropout=False)
    tokenizer = load_tokenizer(path, config.vocab_size, default=True)
    special = torch.tensor(tokenizer.all_special_ids)
    data = load_dataset(None)
    public = text_batches(tokenizer, [s.text for s in data.train], args.max_length)
    private = text_batches(tokenizer, [s.text for s in data.test], args.max_length)
    noise = random_batches(tokenizer, args.random_texts, args.max_length - 2, seed=0)
    embeddings = build_segment(None, CLIENT, Cut(1, 1), num_labels=NUM_LABELS, dropout=False).model \
        .get_input_embeddings().weight.detach()

    test_hidden, test_tokens = client_hidden_states(cuts, private)
    public_hidden, public_tokens = client_hidden_states(cuts, public)
    noise_hidden, noise_tokens = client_hidden_states(cuts, noise)
    print(f"hidden states: {len(test_tokens)} test positions ({len(data.test)} held-out docstrings), "
          f"{len(public_tokens)} public ({len(data.train)} docstrings), {len(noise_tokens)} random "
          f"({args.random_texts} sequences); {time.perf_counter() - started:.0f} s", flush=True)

    results: dict[int, dict] = {}
    for k in cuts:
        h = test_hidden[k]
        predicted = {"nn_cosine": nearest(h, embeddings, "cosine"), "nn_l2": nearest(h, embeddings, "l2")}
        for name, (fit_h, fit_t) in {"linear_docstrings": (public_hidden[k], public_tokens),
                                     "linear_random": (noise_hidden[k], noise_tokens)}.items():
            weights = fit_linear(fit_h, embeddings[fit_t])
            predicted[name] = nearest(_with_bias(h) @ weights, embeddings, "cosine")
        results[k] = {name: accuracy(p, test_tokens, special) for name, p in predicted.items()}
        print(f"cut {k}: " + ", ".join(f"{name} {r['all']:.4f}" for name, r in results[k].items())
              + f"; {time.perf_counter() - started:.0f} s", flush=True)

    seconds = time.perf_counter() - started
    print("\n| cut K1 (client blocks) | " + " | ".join(ATTACKS.values()) + " |")
    print("|---" * (len(ATTACKS) + 1) + "|")
    for k in cuts:
        cells = [f"{100 * results[k][a]['all']:.1f}% / {100 * results[k][a]['words']:.1f}%" for a in ATTACKS]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print(f"\nall tokens / words only ([CLS], [SEP] left out); padding never counts. {seconds:.0f} s, "
          f"{args.threads} threads")
    Path(args.out).write_text(json.dumps({
        "model": "all-MiniLM-L6-v2 (built-in)", "max_length": args.max_length, "threads": args.threads,
        "seconds": round(seconds, 1), "torch": torch.__version__, "test_texts": len(data.test),
        "public_texts": len(data.train), "random_texts": args.random_texts, "ridge": RIDGE, "attacks": ATTACKS,
        "cuts": {str(k): results[k] for k in cuts}}, indent=2) + "\n")
    print(f"figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
