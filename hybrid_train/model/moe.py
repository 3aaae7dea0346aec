"""Mixture-of-experts MLP: a linear router, top-k dropless routing, SwiGLU experts, an optional shared expert.

    logits = router(x)                               (tokens, E), in fp32
    scores = softmax(logits) | sigmoid(logits)
    w, e   = top_k(scores)                           (tokens, k); w / sum(w) with moe_norm_topk
    y      = sum_j w_j * expert_{e_j}(x) + shared(x)

Dropless: there is no capacity; every token reaches its k experts. The (token, expert) pairs are
sorted by expert, so each expert's tokens are one contiguous block: the experts then run as one
grouped GEMM per projection (`torch._grouped_mm` over the blocks' offsets) or, as the reference, one
matmul per expert. `GroupedExperts.forward(x_sorted, counts)` is that step alone, so expert
parallelism (hybrid_train.parallel.ep) can replace it with all-to-all dispatch, `compute` on the
rank's own experts, and all-to-all combine.

Expert weights are stored as transformers' GraniteMoeHybrid / Jamba store them: `gate_up_proj`
(E, 2*hidden, d) with gate rows first, and `down_proj` (E, d, hidden).

Each forward leaves the router's auxiliary losses and the tokens per expert in `self.stats`, and adds
the tokens per expert to `self.load` (until `reset_load()`):
- aux: E * sum_e f_e * P_e, f_e = tokens routed to e / tokens (sums to k), P_e = mean router
  probability of e (softmax; normalized sigmoid scores). k when perfectly balanced (as transformers'
  `load_balancing_loss_func`).
- z: mean over tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_train.model.config import ModelConfig
from hybrid_train.ops import silu_mul, silu_mul_packed


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs these operands here: the op exists in this build, the dtype is
    one it takes (bf16 on CUDA, which needs compute capability 9.0+, and under torch.compile; fp32 / bf16
    on CPU), and every row stride is a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    if (x.device.type == "cuda" or torch.compiler.is_compiling()) and x.dtype != torch.bfloat16:
        return False  # (its traced, meta form takes bf16 only)
    if x.dtype not in (torch.float32, torch.bfloat16):
        return False
    sizes = [x.shape[-1]] + [s for w in weights for s in w.shape[1:]]
    return all(s * x.element_size() % 16 == 0 for s in sizes)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's when it is on (it does not cover grouped_mm),
    else the weights' (bf16 when FSDP gathers them in bf16)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def experts_grouped(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (n, d) sorted by expert, counts (E,) rows per expert -> (n, d): one grouped GEMM per projection."""
    offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's block
    h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs)  # (n, 2*hidden): [gate | up]
    return torch._grouped_mm(silu_mul_packed(h), down.transpose(-2, -1), offs=offs)  # (n, d)


def experts_loop(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The same as experts_grouped with one matmul per expert (the reference; any dtype and width)."""
    outs = []
    for e, rows in enumerate(x.split(counts.tolist())):
        if rows.shape[0]:
            gate, up = F.linear(rows, gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, down[e]))
    return torch.cat(outs) if outs else x.new_zeros(0, down.shape[1])


class GroupedExperts(nn.Module):
    """E SwiGLU experts; forward takes tokens already sorted by expert."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (n, d): rows sorted by expert; counts (E,): rows of each expert (sum n)."""
        return self.compute(x, counts, self.gate_up_proj, self.down_proj)

    def compute(self, x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """The experts whose weights are given (plain tensors) on x sorted by them, counts rows each."""
        dtype = _compute_dtype(x, gate_up)
        x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        if x.shape[0] == 0:  # no rows here (an expert-parallel rank sent none): zero gradients, still a graph
            return x.new_zeros(0, down.shape[1]) + 0 * (x.sum() + gate_up.sum() + down.sum())
        grouped = self.impl == "grouped" or (self.impl == "auto" and grouped_mm_supported(x, gate_up, down))
        if self.impl == "grouped" and not grouped_mm_supported(x, gate_up, down):
            raise RuntimeError(f"model.moe_impl=grouped: torch._grouped_mm cannot run {dtype} experts of widths "
                               f"{tuple(gate_up.shape[1:])} on {x.device.type} here; use moe_impl=auto or loop")
        return (experts_grouped if grouped else experts_loop)(x, gate_up, down, counts)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=out_std)


# The modules whose weights autocast casts to its dtype for their matmuls (GroupedExperts by following
# autocast itself, above): the weights the one-GPU trainer holds in bf16 and the planner counts.
CAST_BY_AUTOCAST = (nn.Linear, GroupedExperts)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP of a block, and the shared expert of an MoE block."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_n_experts, cfg.moe_top_k
        self.score, self.norm_topk = cfg.moe_score, cfg.moe_norm_topk
        self.router = nn.Linear(cfg.d_model, cfg.moe_n_experts, bias=False)
        self.experts = GroupedExperts(cfg.moe_n_experts, cfg.d_model, cfg.expert_hidden, cfg.moe_impl)
        self.shared_expert = SwiGLU(cfg.d_model, cfg.moe_shared_hidden) if cfg.moe_shared_hidden else None
        self.stats: dict[str, torch.Tensor] = {}
        self.load: torch.Tensor | None = None  # tokens per expert summed since reset_load()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, d) -> (router logits (T, E), top-k weights (T, k), top-k experts (T, k)); logits and
        weights in fp32 at least."""
        logits = self.router(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        weights, experts = scores.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d)
        logits, weights, experts = self.route(x)
        flat = experts.flatten()  # (T*k,) the expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # pairs sorted by expert
        counts = flat.new_zeros(self.n_experts).index_add_(0, flat, torch.ones_like(flat))  # (E,), a static shape
        y = self.experts(x[order // self.top_k], counts)  # (T*k, d), sorted by expert
        y = y[order.argsort()].view(-1, self.top_k, shape[-1])  # (T, k, d), back in token order
        out = (y.to(weights.dtype) * weights.unsqueeze(-1)).sum(1).to(y.dtype)  # (T, d)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        self.stats = router_stats(logits, counts, self.score)
        self.load = self.stats["counts"] if self.load is None else self.load + self.stats["counts"]
        return out.view(shape)

    def reset_load(self) -> None:
        self.load = None

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.init_weights(std, out_std)
        if self.shared_expert is not None:
            self.shared_expert.init_weights(std, out_std)


def router_stats(logits: torch.Tensor, counts: torch.Tensor, score: str) -> dict[str, torch.Tensor]:
    """Load-balancing loss, z-loss (both with gradients) and tokens per expert, of one MoE block.

    logits (T, E) in fp32 or wider; counts (E,) (token, expert) pairs per expert."""
    n_tokens, n_experts = logits.shape
    if score == "softmax":
        probs = logits.softmax(-1)
    else:
        scores = logits.sigmoid()
        probs = scores / scores.sum(-1, keepdim=True)
    fraction = counts.to(logits.dtype) / n_tokens  # (E,) sums to top_k
    aux = n_experts * (fraction * probs.mean(0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return {"aux": aux, "z": z, "counts": counts.detach()}
