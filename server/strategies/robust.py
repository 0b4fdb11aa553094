"""Robust aggregation around any strategy (docs/algorithms.md#robust):
update-norm clipping, then a coordinate-wise trimmed mean or median.

Both act on the uploads before the wrapped strategy sees them, so they
combine with every method:

- **Clipping** (Sun et al. 2019): client k's update is its upload minus what
  it downloaded (the strategy's own ``download`` for it, which is the global
  LoRA the client started from), over every factor and head tensor the
  download holds. A head tensor the download lacks (before the first round
  nobody has a global head; each client starts from its own) is measured from
  the coordinate-wise median of the round's uploads of it, so a head cannot
  escape the bound. A factor the download lacks (FedSA-LoRA's B) is the
  client's own and is not measured. An update whose L2 norm exceeds the bound
  is scaled down to it: ``upload <- download + (bound / norm) * (upload -
  download)``. The bound is fixed (``clip_norm``) or a multiple of the round's
  median update norm (``clip_median``).
- **Trimmed mean** (Yin et al. 2018): per coordinate, the ``floor(trim * K)``
  smallest and largest of the K values are trimmed, and each trimmed value is
  replaced by the sample-weighted mean of the kept ones. A method that averages
  with sample weights (FedIT and most others) then computes exactly the
  sample-weighted trimmed mean; any method that averages computes a convex
  combination of kept values, so one client's extreme value cannot move a
  coordinate beyond the range of the others.
- **Median** (Yin et al. 2018): every client's value of a coordinate is
  replaced by the coordinate-wise median (the mean of the two middle values
  for an even count), so any average of them is the median.

Ranks may differ: rank slot i of A (row i) and of B (column i) is a coordinate
shared by the clients whose rank exceeds i, as in HetLoRA and RBLA. A module is
combined over the uploads that carry it; the head per tensor name.

The functions are pure: inputs are never modified, and an upload nothing
changes is passed on as it is (so with a clip bound no update reaches, the
wrapper equals the wrapped strategy exactly).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from .base import ClientInfo, Download, Factors, GlobalModel, RoundResult, Strategy, Upload
from .common import acc_dtype

log = logging.getLogger(__name__)

COMBINES = ("none", "trimmed-mean", "median")
DEFAULT_TRIM = 0.1


@dataclass(frozen=True)
class RobustConfig:
    """Robust aggregation settings; the defaults turn everything off.

    ``clip_norm``: bound on each client's update norm. ``clip_median``: bound
    as this multiple of the round's median update norm (at most one of the
    two). ``combine``: "none", "trimmed-mean" or "median". ``trim``: the share
    trimmed at each end of every coordinate, in (0, 0.5) (trimmed-mean only;
    default 0.1)."""

    clip_norm: float | None = None
    clip_median: float | None = None
    combine: str = "none"
    trim: float | None = None

    def __post_init__(self):
        for name in ("clip_norm", "clip_median"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a finite number > 0, got {value}")
        if self.clip_norm is not None and self.clip_median is not None:
            raise ValueError("give one clip bound: --clip-norm (absolute) or --clip-median (a multiple of the "
                             "round's median update norm), not both")
        if self.combine not in COMBINES:
            raise ValueError(f"combine (--robust) must be one of {', '.join(COMBINES)}, got {self.combine!r}")
        if self.trim is not None:
            if self.combine != "trimmed-mean":
                raise ValueError(f"trim (--trim) applies to --robust trimmed-mean only, not {self.combine!r}")
            if not 0 < self.trim < 0.5:
                raise ValueError(f"trim (--trim) must be in (0, 0.5), got {self.trim}")

    @property
    def active(self) -> bool:
        """Whether any robust step runs."""
        return self.clipping or self.combine != "none"

    @property
    def clipping(self) -> bool:
        return self.clip_norm is not None or self.clip_median is not None

    @property
    def trim_share(self) -> float:
        return DEFAULT_TRIM if self.trim is None else self.trim

    def describe(self) -> str:
        """One line for logs: what runs."""
        parts = []
        if self.clip_norm is not None:
            parts.append(f"update norms clipped to {self.clip_norm:g}")
        if self.clip_median is not None:
            parts.append(f"update norms clipped to {self.clip_median:g} x the round's median")
        if self.combine == "trimmed-mean":
            parts.append(f"coordinate-wise trimmed mean ({self.trim_share:g} at each end)")
        elif self.combine == "median":
            parts.append("coordinate-wise median")
        return ", ".join(parts) or "off"


# ---------------------------------------------------------------- clipping

def _pairs(upload: Upload, reference: Download):
    """(module or head name, "A", "B" or "head", rank slots or None, uploaded,
    downloaded) for every tensor the update is measured on: the rank slots
    both hold of each factor the download carries, and each head tensor both
    carry."""
    for m, f in sorted(upload.factors.items()):
        for which, ref in (("A", reference.A.get(m)), ("B", reference.B.get(m))):
            if ref is None:
                continue  # a factor the client keeps (FedSA-LoRA's B): no global value to move from
            got = getattr(f, which)
            r = min(got.shape[0], ref.shape[0]) if which == "A" else min(got.shape[1], ref.shape[1])
            yield m, which, r, got, ref
    for name, t in sorted(upload.head.items()):
        if name in reference.head:
            yield name, "head", None, t, reference.head[name]


def _slots(t: torch.Tensor, which: str, r: int | None) -> torch.Tensor:
    if r is None:
        return t
    return t[:r] if which == "A" else t[:, :r]


def update_norm(upload: Upload, reference: Download) -> float:
    """The L2 norm of what the client changed: its upload minus its download,
    over every tensor ``_pairs`` measures."""
    total = 0.0
    for _, which, r, got, ref in _pairs(upload, reference):
        dtype = acc_dtype(got.dtype)
        diff = _slots(got, which, r).detach().to(dtype) - _slots(ref, which, r).to(got.device, dtype)
        total += float(diff.square().sum())
    return math.sqrt(total)


def clip_upload(upload: Upload, reference: Download, bound: float) -> Upload:
    """``upload`` with its update scaled to norm ``bound`` when it is larger
    (the same object when it is not). Slots the download lacks (a pruned or
    wider rank) and tensors it does not carry are passed on unchanged."""
    norm = update_norm(upload, reference)
    if norm <= bound:
        return upload
    c = bound / norm

    def shrink(got: torch.Tensor, ref: torch.Tensor, which: str, r: int | None) -> torch.Tensor:
        dtype = acc_dtype(got.dtype)
        out = got.detach().to(dtype).clone()
        part = _slots(out, which, r)
        ref = _slots(ref, which, r).to(out.device, dtype)
        part.copy_(ref + c * (part - ref))
        return out.to(got.dtype)

    factors, head = dict(upload.factors), dict(upload.head)
    for name, which, r, got, ref in _pairs(upload, reference):
        new = shrink(got, ref, which, r)
        if which == "head":
            head[name] = new
        else:
            f = factors[name]
            factors[name] = Factors(new, f.B, f.alpha) if which == "A" else Factors(f.A, new, f.alpha)
    return replace(upload, factors=factors, head=head)


# ---------------------------------------------------------------- coordinate-wise statistics

def trimmed(values: torch.Tensor, weights: torch.Tensor, trim: float) -> torch.Tensor:
    """``values`` (K x ...) with, per coordinate, the ``floor(trim * K)``
    smallest and largest entries replaced by the ``weights``-weighted mean of
    the kept ones; unchanged when that trims nothing. A new tensor."""
    k = values.shape[0]
    cut = math.floor(trim * k)
    if cut == 0:
        return values.clone()
    dtype = acc_dtype(values.dtype)
    x = values.to(dtype)
    order = torch.sort(x, dim=0, stable=True)
    rank = torch.empty_like(order.indices)
    rank.scatter_(0, order.indices, torch.arange(k, device=x.device).view(-1, *([1] * (x.dim() - 1))).expand_as(x))
    kept = (rank >= cut) & (rank < k - cut)
    w = weights.to(device=x.device, dtype=dtype).view(-1, *([1] * (x.dim() - 1))) * kept
    low = order.values[cut]  # the smallest kept value: a kept set of equal values gives exactly that value
    mean = low + (w * (x - low)).sum(0) / w.sum(0)
    return torch.where(kept, x, mean).to(values.dtype)


def median(values: torch.Tensor) -> torch.Tensor:
    """``values`` (K x ...) with every entry replaced by its coordinate's
    median (the mean of the two middle values for an even K). A new tensor."""
    k = values.shape[0]
    s = torch.sort(values.to(acc_dtype(values.dtype)), dim=0).values
    mid = s[(k - 1) // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2
    return mid.to(values.dtype).expand_as(values).clone()


def _combine_stack(values: torch.Tensor, weights: torch.Tensor, config: RobustConfig) -> torch.Tensor:
    if config.combine == "median":
        return median(values)
    return trimmed(values, weights, config.trim_share)


def _rank_segments(ranks: list[int]) -> list[tuple[int, int, list[int]]]:
    """(first slot, end slot, indices of the uploads that hold those slots):
    slot i is held by every upload whose rank exceeds i."""
    bounds = sorted(set(ranks))
    out, start = [], 0
    for end in bounds:
        out.append((start, end, [i for i, r in enumerate(ranks) if r >= end]))
        start = end
    return out


def combine_uploads(uploads: list[Upload], config: RobustConfig) -> list[Upload]:
    """The uploads with each coordinate replaced as ``config.combine`` says
    (trimmed-mean or median), over the uploads that hold it; weights are
    sample counts. New uploads; inputs untouched."""
    ns = torch.tensor([float(u.num_samples) for u in uploads], dtype=torch.float64)
    factors = [dict(u.factors) for u in uploads]
    heads = [dict(u.head) for u in uploads]
    modules = sorted({m for u in uploads for m in u.factors})
    for m in modules:
        have = [i for i, u in enumerate(uploads) if m in u.factors]
        for which in ("A", "B"):
            tensors = {i: getattr(uploads[i].factors[m], which) for i in have}
            out = {i: t.detach().clone() for i, t in tensors.items()}
            ranks = [t.shape[0] if which == "A" else t.shape[1] for t in tensors.values()]
            for start, end, members in _rank_segments(ranks):
                idx = [have[j] for j in members]
                part = [(tensors[i][start:end] if which == "A" else tensors[i][:, start:end]) for i in idx]
                new = _combine_stack(torch.stack(part), ns[idx], config)
                for j, i in enumerate(idx):
                    if which == "A":
                        out[i][start:end] = new[j]
                    else:
                        out[i][:, start:end] = new[j]
            for i in have:
                f = factors[i][m]
                factors[i][m] = Factors(out[i], f.B, f.alpha) if which == "A" else Factors(f.A, out[i], f.alpha)
    for name in sorted({n for u in uploads for n in u.head}):
        idx = [i for i, u in enumerate(uploads) if name in u.head]
        new = _combine_stack(torch.stack([uploads[i].head[name] for i in idx]), ns[idx], config)
        for j, i in enumerate(idx):
            heads[i][name] = new[j]
    return [replace(u, factors=f, head=h) for u, f, h in zip(uploads, factors, heads)]


# ---------------------------------------------------------------- the wrapper

class Robust(Strategy):
    """Any strategy with robust aggregation in front of it.

    It is the wrapped method in every respect but ``aggregate``: same name,
    capabilities, state, downloads and export. It is not registered (its class
    has no name); ``robust()`` builds it."""

    def __init__(self, inner: Strategy, config: RobustConfig):
        super().__init__(inner.seed)
        self.inner, self.config = inner, config
        self.name = inner.name
        self.heterogeneous_ranks = inner.heterogeneous_ranks
        self.block_subsets = inner.block_subsets
        self.mixed_alphas = inner.mixed_alphas

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        return self.inner.init_state(initial, clients)

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        return self.inner.download(state, client, round_index)

    def export(self, state: dict) -> GlobalModel:
        return self.inner.export(state)

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Clip, then combine, then the wrapped method's own aggregation."""
        return self.inner.aggregate(state, robust_uploads(self.inner, state, uploads, round_index, self.config),
                                    round_index)


def reference_for(strategy: Strategy, state: dict, upload: Upload, round_index: int,
                  head_medians: dict[str, torch.Tensor]) -> Download:
    """What the uploading client started the round from, as the strategy hands
    it out; a head tensor it does not hand out is referred to ``head_medians``."""
    alpha = next(iter(upload.factors.values())).alpha if upload.factors else 1.0
    info = ClientInfo(upload.client, upload.rank, alpha, upload.blocks, upload.num_samples)
    download = strategy.download(state, info, round_index)
    return replace(download, head={**head_medians, **download.head})


def head_medians(uploads: list[Upload]) -> dict[str, torch.Tensor]:
    """Per head tensor name, the coordinate-wise median of the uploads that carry it."""
    names = sorted({n for u in uploads for n in u.head})
    return {n: median(torch.stack([u.head[n] for u in uploads if n in u.head]))[0] for n in names}


def robust_uploads(strategy: Strategy, state: dict, uploads: list[Upload], round_index: int,
                   config: RobustConfig) -> list[Upload]:
    """The round's uploads after clipping and combining as ``config`` says."""
    out = list(uploads)
    if config.clipping and out:
        medians = head_medians(out)
        refs = [reference_for(strategy, state, u, round_index, medians) for u in out]
        norms = [update_norm(u, r) for u, r in zip(out, refs)]
        if config.clip_norm is not None:
            bound = config.clip_norm
        else:
            bound = config.clip_median * float(torch.tensor(norms, dtype=torch.float64).median())
        clipped = [(u.client, n) for u, n in zip(out, norms) if n > bound]
        if clipped:
            log.warning("round %d: update norms clipped to %.4g: %s", round_index, bound,
                        ", ".join(f"{c} ({n:.4g})" for c, n in clipped))
        out = [clip_upload(u, r, bound) for u, r in zip(out, refs)]
    if config.combine != "none" and out:
        if config.combine == "trimmed-mean" and math.floor(config.trim_share * len(out)) == 0:
            log.warning("round %d: a trimmed mean of %d uploads with trim %g trims nothing per coordinate (it "
                        "needs at least %d uploads); slots fewer clients hold are not trimmed either",
                        round_index, len(out), config.trim_share, math.ceil(1 / config.trim_share))
        out = combine_uploads(out, config)
    return out


def robust(strategy: Strategy, config: RobustConfig | None) -> Strategy:
    """``strategy`` wrapped in robust aggregation when ``config`` turns any on,
    otherwise ``strategy`` itself."""
    if config is None or not config.active:
        return strategy
    return Robust(strategy, config)
