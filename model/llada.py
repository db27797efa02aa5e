"""The LLaDA architecture as one readable, single-device PyTorch module.

A LLaMA-style pre-norm transformer without the causal mask:

    x = wte(input_ids)
    for each block:
        h = x + attn_out(Attention(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))   n = attn_norm(x)
        x = h + ff_out(silu(ff_proj(m)) * up_proj(m))                              m = ff_norm(h)
    logits = transformer.ff_out(ln_f(x))          # untied head; logits[i] predicts token i (no shift)

Design choices (all LLaDA's): RMSNorm computed in fp32 and cast back before the weight; RoPE
in fp32 with the rotate-half convention and theta 500000; no biases anywhere; MHA, or GQA when
``n_kv_heads < n_heads``; attention over all positions, with an optional key-padding mask.

Parameter names equal LLaDA's Hugging Face names without the leading ``model.``
(``transformer.blocks.3.q_proj.weight`` <-> ``model.transformer.blocks.3.q_proj.weight``), so HF
conversion is a prefix, not a table. This module knows nothing of process groups; parallelism is
applied to a built model by ``train.parallelize``.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.attention import attention
from model.config import ModelConfig

CHECKPOINTING_MODES = ("none", "selective", "full")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[B, 1, S, head_dim]`` in fp32 for integer positions ``[B, S]``."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, S, head_dim/2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, head_dim]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """One pre-norm block: bidirectional attention then SwiGLU, each with a residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, kv, f = config.d_model, config.kv_dim, config.mlp_hidden_size
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, f, bias=False)  # the SwiGLU gate (SiLU is applied to it)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.ff_out = nn.Linear(f, d, bias=False)  # the down projection
        self.attention_backend = "auto"
        self.selective_checkpointing = False

    def _attention(self, q, k, v, key_padding_mask):
        return attention(q, k, v, key_padding_mask, backend=self.attention_backend)

    def _swiglu(self, m: torch.Tensor) -> torch.Tensor:
        return F.silu(self.ff_proj(m)) * self.up_proj(m)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.selective_checkpointing and torch.is_grad_enabled():
            a = checkpoint(self._attention, q, k, v, key_padding_mask, use_reentrant=False)
        else:
            a = self._attention(q, k, v, key_padding_mask)
        h = x + self.attn_out(a.transpose(1, 2).reshape(b, s, -1))
        m = self.ff_norm(h)
        if self.selective_checkpointing and torch.is_grad_enabled():
            g = checkpoint(self._swiglu, m, use_reentrant=False)
        else:
            g = self._swiglu(m)
        return h + self.ff_out(g)


class LLaDAModel(nn.Module):
    """LLaDA: ``forward(input_ids, attention_mask=None, position_ids=None) -> logits``.

    Args:
        input_ids: ``[B, S]`` token ids (masked positions hold ``config.mask_token_id``).
        attention_mask: optional ``[B, S]``, 1/True for real tokens, 0/False for padding; padded
            keys are invisible to every query. ``None`` means attend everywhere (training).
        position_ids: optional ``[B, S]`` RoPE positions; default ``0..S-1``. Left-padded batches
            pass positions that start at 0 on the first real token.
    Returns:
        logits ``[B, S, embedding_size]`` in the compute dtype; logits at i predict token i.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_size, config.d_model),
                blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
                ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),
            )
        )
        self.activation_checkpointing = "none"

    # ----- options applied after construction (by train.parallelize or tools) ------------------
    def set_activation_checkpointing(self, mode: str) -> None:
        """``none``; ``selective`` (recompute attention cores and SwiGLU products); ``full``
        (recompute every block from its input)."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"activation checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
        self.activation_checkpointing = mode
        for block in self.transformer.blocks:
            block.selective_checkpointing = mode == "selective"

    def set_attention_backend(self, backend: str) -> None:
        for block in self.transformer.blocks:
            block.attention_backend = backend

    # ----- forward --------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids, attention_mask, position_ids))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta)
        x = self.transformer.wte(input_ids)
        full = self.activation_checkpointing == "full" and torch.is_grad_enabled()
        for block in self.transformer.blocks:
            if full:
                x = checkpoint(block, x, cos, sin, attention_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, attention_mask)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ff_out(self.transformer.ln_f(x))


def init_std_of(name: str, init_std: float, n_layers: int) -> float | None:
    """The init standard deviation of parameter ``name`` (None for norm weights, which are 1)."""
    if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
        return None
    if ".attn_out." in name or (".blocks." in name and ".ff_out." in name):
        return init_std / (2 * n_layers) ** 0.5
    return init_std


def init_tensor(
    name: str, shape, seed: int, init_std: float, n_layers: int,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The full tensor of parameter ``name`` under the layout-independent init (see
    :func:`init_weights`), drawn in fp32 by a generator of ``device``'s type seeded by
    ``(seed, crc32(name))`` and cast to ``dtype``. On the CPU these are the reference numbers;
    on a GPU the draw runs at the device's speed (other numbers than the CPU's, but the same
    for every layout on that device type)."""
    device = torch.device(device)
    std = init_std_of(name, init_std, n_layers)
    if std is None:
        return torch.ones(shape, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    full = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std
    return full.to(dtype)


def init_weights(model: nn.Module, seed: int, init_std: float, n_layers: int) -> None:
    """Layout-independent initialization: each full tensor is drawn from a generator seeded by
    ``(seed, crc32(parameter name))``, so any later sharding of the same model starts from the
    same numbers. Linear and embedding weights ~ N(0, init_std); the output projections of each
    residual branch (``attn_out``, block ``ff_out``) are scaled by 1/sqrt(2·n_layers); norms = 1.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_tensor(name, p.shape, seed, init_std, n_layers, device=p.device, dtype=p.dtype))


def build_model(config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> LLaDAModel:
    """Build and initialize a model; ``device="meta"`` builds shapes only (e.g. to count 8B).
    The parameters are created without memory and materialized on ``device`` directly."""
    with torch.device("meta"):
        model = LLaDAModel(config)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        init_weights(model, seed, config.init_std, config.n_layers)
    return model
