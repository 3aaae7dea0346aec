"""The hybrid Mamba-2 / attention decoder (Bamba's block), whole, in one file.

Nothing here knows about parallelism: head counts are inferred from weight shapes
(`view(b, t, -1, head_dim)`), so a tensor-parallel shard of a module runs the same code.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_train.model.config import ATTENTION, ModelConfig
from hybrid_train.model.moe import MoE, SwiGLU
from hybrid_train.ops import causal_attention, conv_ssd_scan, fused_linear_cross_entropy, gated_rms_norm, rms_norm


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The part of a parameter this process holds. Tensor parallelism (applied from outside) makes the
    Mamba-2 tensors used directly in forward sharded tensors with a `to_local()`; the math below then
    runs on this rank's heads and groups. Anything else passes through unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, autocast_output: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.autocast_output = autocast_output
        """Every reader casts the output under autocast: written in its dtype once (ops/norm.py, rms_norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.autocast_output)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


def apply_rotary(x: torch.Tensor, position_ids: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """RoPE on the first `rotary_dim` dims of each head, non-interleaved halves. x (b, t, h, d)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim)
    angles = position_ids[..., None].float() * inv_freq  # (b, t, rotary_dim/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, :, None]  # (b, t, 1, rotary_dim)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, :, None]
    rot, keep = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([(rot * cos + rotated * sin).to(x.dtype), keep], -1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rotary_dim = int(cfg.head_dim * cfg.partial_rotary_factor) if cfg.attn_rope else 0
        self.rope_theta = cfg.rope_theta
        self.scale = cfg.attn_scale
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim)  # (b, t, hq, d)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)  # (b, t, hkv, d)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        if self.rotary_dim:
            q = apply_rotary(q, position_ids, self.rotary_dim, self.rope_theta)
            k = apply_rotary(k, position_ids, self.rotary_dim, self.rope_theta)
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), seq_idx,
                             self.scale)  # (b, hq, t, d)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: in_proj -> causal conv1d + SiLU on x, B, C -> SSD scan -> gated RMSNorm -> out_proj.

    The five in_proj components are separate Linears (HF packs them as [z | x | B | C | dt]) so that
    tensor parallelism can split each one by heads or groups with a plain row split.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, d_inner, n_state, n_heads = cfg.d_model, cfg.d_inner, cfg.ssm_d_state, cfg.ssm_n_heads
        bc_dim = cfg.ssm_n_groups * n_state
        self.cfg = cfg
        self.head_dim = cfg.ssm_head_dim
        self.d_state = n_state
        self.chunk_size = cfg.ssm_chunk_size
        self.norm_group_size = d_inner // cfg.ssm_n_groups
        self.dt_limit = tuple(cfg.ssm_dt_limit)
        self.in_proj = nn.ModuleDict({
            "z": nn.Linear(d, d_inner, bias=cfg.ssm_proj_bias),
            "x": nn.Linear(d, d_inner, bias=cfg.ssm_proj_bias),
            "B": nn.Linear(d, bc_dim, bias=cfg.ssm_proj_bias),
            "C": nn.Linear(d, bc_dim, bias=cfg.ssm_proj_bias),
            "dt": nn.Linear(d, n_heads, bias=cfg.ssm_proj_bias),
        })
        self.conv1d = nn.ModuleDict({
            name: nn.Conv1d(c, c, cfg.ssm_d_conv, groups=c, bias=cfg.ssm_conv_bias)
            for name, c in (("x", d_inner), ("B", bc_dim), ("C", bc_dim))
        })
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = RMSNorm(d_inner, cfg.norm_eps)  # weight of the gated, grouped norm
        self.out_proj = nn.Linear(d_inner, d, bias=cfg.ssm_proj_bias)

    def forward(self, u: torch.Tensor, position_ids: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        z = self.in_proj["z"](u)  # (b, t, d_inner)
        convs = [self.conv1d[name] for name in ("x", "B", "C")]
        # conv1d + SiLU on x, B, C, then the SSD scan: one op that keeps only the conv inputs for backward
        y = conv_ssd_scan(
            self.in_proj["x"](u),  # (b, t, d_inner)
            self.in_proj["B"](u),  # (b, t, g*n)
            self.in_proj["C"](u),
            [_local(conv.weight) for conv in convs],
            [_local(conv.bias) for conv in convs],
            self.in_proj["dt"](u),  # (b, t, h)
            -torch.exp(_local(self.A_log).float()),
            self.chunk_size,
            self.head_dim,
            self.d_state,
            D=_local(self.D),
            dt_bias=_local(self.dt_bias),
            dt_softplus=True,
            dt_limit=self.dt_limit,
            seq_idx=seq_idx,
        )  # (b, t, d_inner)
        y = gated_rms_norm(y, z, _local(self.norm.weight), self.norm.eps, self.norm_group_size)
        return self.out_proj(y)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        cfg = self.cfg
        for proj in self.in_proj.values():
            nn.init.normal_(proj.weight, std=std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)
        for conv in self.conv1d.values():
            conv.reset_parameters()
        # dt log-uniform in [dt_min, dt_max], floored; dt_bias is its inverse softplus (mamba_ssm init).
        log_dt = torch.empty_like(self.dt_bias, dtype=torch.float32).uniform_(
            math.log(cfg.ssm_dt_min), math.log(cfg.ssm_dt_max))
        dt = log_dt.exp().clamp(min=cfg.ssm_dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        low, high = cfg.ssm_a_init_range
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(low, high).log())
        nn.init.ones_(self.D)
        self.norm.init_weights()


class Block(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then + mlp(norm(x)); the MLP is dense or a mixture of experts."""

    def __init__(self, cfg: ModelConfig, layer_type: str, moe: bool = False):
        super().__init__()
        self.layer_type = layer_type
        # (their readers are Linears and experts, which autocast casts to; not so the final norm's, divided
        # by logits_scaling first)
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps, autocast_output=True)
        self.mixer = Attention(cfg) if layer_type == ATTENTION else Mamba2Mixer(cfg)
        self.mlp = MoE(cfg) if moe else SwiGLU(cfg.d_model, cfg.mlp_hidden) if cfg.mlp_hidden else None
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, autocast_output=True) if self.mlp is not None else None
        self.residual_multiplier = cfg.residual_multiplier

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        x = x + self._scaled(self.mixer(self.mixer_norm(x), position_ids, seq_idx))
        if self.mlp is not None:
            x = x + self._scaled(self.mlp(self.mlp_norm(x)))
        return x

    def _scaled(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier

    def init_weights(self, std: float, out_std: float) -> None:
        self.mixer_norm.init_weights()
        self.mixer.init_weights(std, out_std)
        if self.mlp is not None:
            self.mlp_norm.init_weights()
            self.mlp.init_weights(std, out_std)


class LMHead(nn.Linear):
    """The output projection; given labels it returns the loss instead of the logits.

    The loss is computed inside this forward because FSDP gathers the head's weight only while this
    module runs (outside it the weight is a shard). The fused loss never holds the (tokens x vocab)
    logits; it needs the whole head, so a vocabulary-sharded head (tensor parallel) returns logits."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                z_loss: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, d) -> logits (b, t, vocab); with labels (b, t): (loss, cross entropy) as lm_loss."""
        if labels is None:
            return super().forward(x)
        return fused_linear_cross_entropy(x, self.weight, labels, z_loss)


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Keyed by layer index so parameter names are stable across stages, checkpoints and export.
        moe = set(cfg.moe_layers)
        self.layers = nn.ModuleDict({str(i): Block(cfg, kind, i in moe) for i, kind in enumerate(cfg.layer_types)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share embedding and head when configured; call again after `to_empty`, which unties them."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                z_loss: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids (b, t) -> logits (b, t, vocab). seq_idx (b, t) separates packed documents.

        With labels (b, t): (loss, cross entropy) of the fused head instead, equal to
        `lm_loss(logits, labels, z_loss)` without materializing the logits; the loss includes the
        routers' losses (`router_loss()`) when the model has MoE blocks."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if not self.cfg.doc_masking:
            seq_idx = None
        h = self.embed(input_ids)  # (b, t, d)
        if self.cfg.embedding_multiplier != 1.0:
            h = h * self.cfg.embedding_multiplier
        for block in self.layers.values():
            h = block(h, position_ids, seq_idx)
        h = self.norm(h)
        if self.cfg.logits_scaling != 1.0:  # logits / s, by linearity of the head (and so of the fused loss)
            h = h / self.cfg.logits_scaling
        if labels is None:
            return self.lm_head(h)
        loss, ce = self.lm_head(h, labels, z_loss)
        if self.cfg.moe_n_experts:
            loss = loss + self.router_loss()
        return loss, ce

    def moe_blocks(self) -> dict[str, MoE]:
        """Layer index -> MoE of the blocks that have one."""
        return {i: block.mlp for i, block in self.layers.items() if isinstance(block.mlp, MoE)}

    def router_loss(self) -> torch.Tensor:
        """moe_aux_loss_coef * load-balancing loss + moe_z_loss_coef * z-loss, each the mean over MoE
        blocks, of the last forward (with gradients; add it to a loss computed from the logits)."""
        blocks = [m.stats for m in self.moe_blocks().values() if m.stats]
        if not blocks:
            return torch.zeros((), device=self.embed.weight.device)
        aux = torch.stack([s["aux"] for s in blocks]).mean()
        z = torch.stack([s["z"] for s in blocks]).mean()
        return self.cfg.moe_aux_loss_coef * aux + self.cfg.moe_z_loss_coef * z

    @torch.no_grad()
    def router_stats(self, reset: bool = False) -> dict[str, torch.Tensor]:
        """Detached, in the order of moe_blocks(): `load` (MoE blocks, E) tokens per expert summed over
        the forwards since the last reset; `counts` the same of the last forward; `aux` and `z` (MoE
        blocks,) the unweighted losses of the last forward. reset: start the next sum afresh."""
        blocks = list(self.moe_blocks().values())
        if not blocks or not all(m.stats for m in blocks):
            return {}
        out = {key: torch.stack([m.stats[key].detach().float() for m in blocks]) for key in ("counts", "aux", "z")}
        out["load"] = torch.stack([m.load.float() for m in blocks])
        if reset:
            for m in blocks:
                m.reset_load()
        return out

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every parameter in place (after building on meta and materializing)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.layers.values():
            block.init_weights(std, out_std)
        self.norm.init_weights()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
