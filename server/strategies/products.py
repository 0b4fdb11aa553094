"""Dense products of stacked LoRA factors, the costly step of the exact
strategies (FLoRA, FedEx-LoRA, LoRA-FAIR, FlexLoRA with many clients).

``factor_sum`` forms ``sum_k c_k B_k A_k`` (d_out x d_in) without building the
whole stacked pair: clients are taken a block of about ``CHUNK`` stacked ranks
at a time, each block stacked into small buffers that stay in cache and
multiplied into the sum. With 1,000 clients the full stack is ~75 MB per
module, and copying it costs about as much as the product itself.

``matmul`` is ``a @ b``. For float32 on the CPU it goes through oneDNN's
matmul (the kernel torch uses for its own mkldnn linear layers) where torch
has one: on CPUs where MKL's sgemm does not take its AVX-512 path (AMD) it is
about twice as fast. Both compute the float32 product with float32
accumulation; they differ only in the order of the additions (tested against
float64 in tests/test_aggregation_products.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import Factors

# Stacked ranks per block of factor_sum: a block of d x CHUNK floats (6 MB at
# d = 768) stays in cache, and the product of a block is still a large GEMM.
CHUNK = 2048


def _onednn_linear():
    """torch's oneDNN linear op (``x @ w.T``), or None when this build lacks
    it. The op is torch-internal: it is used only after it has given ``@``'s
    product on a small probe, so a torch whose op differs falls back to ``@``."""
    if not torch.backends.mkldnn.is_available():
        return None
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return None
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    w = torch.arange(20, dtype=torch.float32).reshape(5, 4) / 11
    try:
        out = op(a, w, None, "none", [], "")
    except Exception:  # noqa: BLE001 - any failure of an internal op means: not this build's
        return None
    if not (isinstance(out, torch.Tensor) and out.shape == (3, 5) and torch.allclose(out, a @ w.T, atol=1e-5)):
        return None
    return op


def _reads_transposed_weight(op) -> bool:
    """Whether ``op`` gives the right product for a weight passed as a
    transposed view (the layout of ``a.T`` for a contiguous ``a``): oneDNN
    reads that layout directly, which spares a copy of a large stacked factor."""
    if op is None:
        return False
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    w = torch.arange(20, dtype=torch.float32).reshape(4, 5) / 11  # the weight is w.T (5 x 4)
    try:
        out = op(a, w.T, None, "none", [], "")
    except Exception:  # noqa: BLE001 - as above
        return False
    return isinstance(out, torch.Tensor) and out.shape == (3, 5) and torch.allclose(out, a @ w, atol=1e-5)


_LINEAR = _onednn_linear()
_TRANSPOSED_WEIGHT = _reads_transposed_weight(_LINEAR)


def use_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``matmul(a, b)`` runs through oneDNN: float32 CPU matrices, in a torch built with it."""
    return (_LINEAR is not None and a.dim() == 2 and b.dim() == 2 and a.dtype == torch.float32
            and b.dtype == torch.float32 and a.device.type == "cpu" and b.device.type == "cpu"
            and not (a.requires_grad or b.requires_grad))


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for matrices (m x k by k x n), a new tensor; float32 CPU
    products through oneDNN (module docstring), anything else through ``@``."""
    if not use_onednn(a, b):
        return a @ b
    return matmul_bt(a, b.T)


def matmul_bt(a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """``a @ bt.T``, with the right factor given transposed (n x k): the
    layout oneDNN's linear takes without a copy. ``bt`` may also be the
    transposed view of a contiguous k x n matrix (``b.T``), which oneDNN
    reads as it is where this build allows it (a copy otherwise)."""
    if not use_onednn(a, bt):
        return a @ bt.T
    if a.shape[0] == 0 or bt.shape[0] == 0 or a.shape[1] == 0:
        return a.new_zeros(a.shape[0], bt.shape[0])
    if not (_TRANSPOSED_WEIGHT and bt.T.is_contiguous()):
        bt = bt.contiguous()
    return _LINEAR(a.contiguous(), bt, None, "none", [], "")


class Workspace:
    """Flat buffers reused from one module to the next (one aggregation's
    lifetime): ``take`` hands out a contiguous view of the requested shape,
    growing a buffer only when a larger one is asked for. A view is valid
    until the next ``take`` of the same name."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < size:
            buf = torch.empty(size, dtype=dtype)
            self._buffers[name] = buf
        return buf[:size].view(shape)


def factor_sum(coeffs: Sequence[float], factors: Sequence[Factors], dtype: torch.dtype,
               chunk: int = CHUNK, workspace: Workspace | None = None) -> torch.Tensor:
    """``sum_k coeffs[k] * B_k @ A_k`` (d_out x d_in) in ``dtype``: exact to
    rounding (the same sum as one product of the stacked factors). Inputs are
    untouched; ranks may differ between clients. The blocks are stacked into
    ``workspace``'s buffers (pass one workspace to the calls of one
    aggregation: fresh buffers cost page faults; a new one per call otherwise)."""
    if not factors:
        raise ValueError("factor_sum needs at least one factor pair")
    if len(coeffs) != len(factors):
        raise ValueError(f"factor_sum: {len(coeffs)} coefficients for {len(factors)} factor pairs")
    device = factors[0].B.device
    reuse = device.type == "cpu"  # buffers are CPU memory
    workspace = workspace if workspace is not None else Workspace()
    d_out, d_in = factors[0].B.shape[0], factors[0].A.shape[1]
    out = None
    start = 0
    while start < len(factors):
        stop, width = start, 0
        while stop < len(factors) and (width == 0 or width + factors[stop].rank <= chunk):
            width += factors[stop].rank
            stop += 1
        block = factors[start:stop]
        ranks = torch.tensor([f.rank for f in block])
        col = torch.tensor([float(c) for c in coeffs[start:stop]], dtype=dtype).repeat_interleave(ranks)
        Bs = [f.B.detach().to(dtype) for f in block]
        # The right factor stacked upright (width x d_in, a plain copy of the rows):
        # oneDNN reads its transposed view in place.
        As = [f.A.detach().to(dtype) for f in block]
        if reuse:
            L = torch.cat(Bs, dim=1, out=workspace.take("factor_sum.L", (d_out, width), dtype))
            R = torch.cat(As, dim=0, out=workspace.take("factor_sum.R", (width, d_in), dtype))
        else:
            L, R = torch.cat(Bs, dim=1), torch.cat(As, dim=0)
        part = matmul_bt(L.mul_(col.to(device)), R.T)
        out = part if out is None else out.add_(part)
        start = stop
    return out
