"""SwiGLU MLPs and the mixture-of-experts block.

The checkpoint stores every routed expert as three matrices
(``mlp.experts.{j}.{gate,up,down}_proj.weight``); here they are stacked per layer into
``experts.w13`` [E, 2I, D] (gate rows then up rows) and ``experts.w2`` [E, D, I], so a whole MoE
block runs as a few grouped matrix products with no host synchronisation. ``EXPERT_KEYS`` declares
that mapping once, for the loader.

Routing (as upstream): gate logits in float32, softmax over all experts, top-k, weights not
renormalised, routed scaling 1.0; the weighted sum is taken in float32. The shared experts are one
wider MLP applied to every token. At decode time on CUDA the whole block runs as ``kernels.moe.moe_decode`` (and
the dense MLP through ``kernels.linear.gemv``), batch invariant; for more tokens (prefill) the grouped products are
``kernels.grouped_gemm.grouped_mm`` on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .config import LanguageConfig

# checkpoint sub-key of one expert -> (stacked parameter, row offset in units of the expert width)
EXPERT_KEYS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", 0)}
STACKS = tuple(dict.fromkeys(stack for stack, _ in EXPERT_KEYS.values()))  # ("w13", "w2")


def expert_blocks(stack: str) -> int:
    """How many checkpoint matrices of one expert are stacked, row-wise, into ``stack``."""
    return sum(1 for s, _ in EXPERT_KEYS.values() if s == stack)


def expert_matrix_shape(stack: str, stacked_shape: torch.Size | tuple[int, ...]) -> torch.Size:
    """Shape of one expert's checkpoint matrix inside a stacked parameter [E, rows, cols]."""
    return torch.Size([stacked_shape[1] // expert_blocks(stack), stacked_shape[2]])


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.register_buffer("gate_up", torch.empty(0), persistent=False)  # see fuse()

    def fuse(self) -> None:
        """Stack gate_proj and up_proj into one matrix (one product instead of two); the parameters
        become views into it, so names and values stay those of the checkpoint."""
        self.gate_up = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        n = self.gate_proj.weight.shape[0]
        self.gate_proj.weight = nn.Parameter(self.gate_up[:n], requires_grad=False)
        self.up_proj.weight = nn.Parameter(self.gate_up[n:], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up.numel():
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` of one token per row: on CUDA both products through ``kernels.linear.gemv``, so that a row's
        result does not depend on the batch (cuBLAS picks its reduction by the number of rows).
        x [..., D] -> [..., D]"""
        down = self.down_proj.weight
        if not (self.gate_up.numel() and kernels.linear.gemv_ok(x, self.gate_up) and kernels.linear.gemv_ok(x, down)):
            return self(x)
        gate, up = kernels.linear.gemv(x, self.gate_up).chunk(2, dim=-1)
        return kernels.linear.gemv(F.silu(gate) * up, down)


class Experts(nn.Module):
    """The routed experts of one layer, stacked."""

    def __init__(self, n: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Parameter(torch.empty(n, 2 * hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, hidden))


IMPLS = ("grouped", "loop")


def set_impl(module: nn.Module, impl: str) -> None:
    """Choose the routed-expert implementation of every MoE block in ``module`` (a model, or one block): "grouped"
    (fast) or "loop" (plain). The engine sets its model's from ``EngineConfig.moe_impl``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}: use one of {', '.join(IMPLS)}")
    for m in module.modules():
        if isinstance(m, MoE):
            m.impl = impl


class MoE(nn.Module):
    # "grouped": the fast path: sort token-expert pairs and run grouped matrix products, or on CUDA for
    # decode the Triton kernels of ``kernels.moe``; both are free of host synchronisation.
    # "loop": one expert at a time, as the research code does (the plain path the tests compare to).
    # A block's own choice (``set_impl``); this is the default.
    impl: str = "grouped"

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.n_routed_experts, bias=False)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] float32, expert ids [N, k] int64)"""
        scores = F.linear(x.float(), self.gate.weight.float()).softmax(dim=-1)
        return torch.topk(scores, self.top_k, dim=-1, sorted=False)

    def decode_kernels_ok(self, x: torch.Tensor) -> bool:
        """Whether x's tokens (up to MAX_DECODE_TOKENS: decode) run through the fused decode kernels."""
        return (self.impl == "grouped" and kernels.launch.available(x) and self.shared_experts.gate_up.numel() > 0
                and kernels.moe.moe_decode_ok(x.numel() // x.shape[-1], x.shape[-1], self.experts.hidden))

    def _expert_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.gate.weight, self.experts.w13, self.experts.w2, self.shared_experts.gate_up,
                self.shared_experts.down_proj.weight)

    def _add_slots(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The fused kernels' slot outputs [N, k + shared, D] -> the block's output [N, D] (rounded as the plain
        path: each sum to the model's dtype, then their sum). Added slot by slot, element-wise: a reduction
        kernel's order may depend on the number of tokens, an element-wise chain's cannot."""
        routed, shared = y[:, 0], y[:, self.top_k]
        for j in range(1, self.top_k):
            routed = routed + y[:, j]
        for j in range(self.top_k + 1, y.shape[1]):
            shared = shared + y[:, j]
        return routed.to(dtype) + shared.to(dtype)

    def decode_residual(self, x: torch.Tensor, a: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """h + MoE(norm(h)) with h = x + a, for a decode step's tokens: the residual add and the norm run inside
        the router kernel (see ``kernels.moe.moe_decode_residual``). x, a [..., D] -> [..., D]"""
        d = x.shape[-1]
        h, y = kernels.moe.moe_decode_residual(x.reshape(-1, d), a.reshape(-1, d), norm.weight, norm.eps,
                                               *self._expert_weights(), self.top_k)
        return (h + self._add_slots(y, x.dtype)).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        if self.decode_kernels_ok(x) and x.shape[0] * self.top_k <= kernels.launch.MAX_DECODE_TOKENS:
            # A few tokens outside decode (at most 64 token-expert pairs; more take the grouped products below):
            # routing, routed and shared experts in three kernels that read only the chosen experts.
            y = kernels.moe.moe_decode(x, *self._expert_weights(), self.top_k)
            return self._add_slots(y, x.dtype).view(shape)
        weights, ids = self.route(x)
        if self.impl == "loop":
            y = looped_experts(x, weights, ids, self.experts)
        else:
            y = grouped_experts(x, weights, ids, self.experts)
        return (y + self.shared_experts(x)).view(shape)


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: Experts) -> torch.Tensor:
    """Sorted token-expert pairs through two grouped GEMMs (on CUDA ``kernels.grouped_gemm.grouped_mm``, else
    ``torch._grouped_mm``). x [N, D] -> [N, D]"""
    n, k = ids.shape
    flat = ids.flatten()  # [N*k]
    # Sorting small integer keys: one radix pass for uint8 instead of eight for int64.
    order = flat.to(torch.uint8 if experts.w13.shape[0] <= 256 else torch.int32).argsort(stable=True)
    token = order // k  # which token each sorted pair belongs to
    counts = torch.zeros(experts.w13.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)  # end row of each expert's group
    grouped = kernels.grouped_gemm
    if grouped.grouped_mm_ok(x, experts.w13, silu_pairs=True) and grouped.grouped_mm_ok(x, experts.w2):
        # Triton: each expert's weights read from HBM once, SwiGLU in the gate‖up epilogue (no [N*k, 2I] tensor).
        h = grouped.grouped_mm(x[token], experts.w13, offs, silu_pairs=True)  # [N*k, I]
        y = grouped.grouped_mm(h, experts.w2, offs)  # [N*k, D]
    else:
        h = torch._grouped_mm(x[token], experts.w13.transpose(1, 2), offs=offs)  # [N*k, 2I]
        gate, up = h.split(experts.hidden, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, experts.w2.transpose(1, 2), offs=offs)  # [N*k, D]
    # Back to (token, slot) order, then each token's k products added in slot order: deterministic (an index_add_
    # would add them with atomics, in whatever order they land, and a prompt's cache would differ run to run).
    y = y.float() * weights.flatten()[order, None]
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted.view(n, k, -1).sum(1).to(x.dtype)


def looped_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: Experts) -> torch.Tensor:
    """The plain path: a Python loop over the experts that received tokens (synchronises the host)."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[token], experts.w13[e]).split(experts.hidden, dim=-1)
        y = F.linear(F.silu(gate) * up, experts.w2[e])
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)
