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
conversion is a prefix, not a table. This module knows nothing of process groups. The block and
the head exist once, here: ``train.parallelize`` builds its tensor-parallel layers from
:class:`LLaDABlock` and :func:`lm_head` through their seams (the projection factory, the share of
heads, the ``[s, b, d]`` layout), and activation checkpointing is the block's in every layout.
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


def plain_linear(n_in: int, n_out: int, kind: str) -> nn.Module:
    """The default projection factory: a bias-free ``nn.Linear``. ``kind`` says how a parallel
    factory would split it: ``"column"`` (output features: q/k/v, gate, up, the LM head) or
    ``"row"`` (input features: ``attn_out``, the block's ``ff_out``); one device ignores it."""
    return nn.Linear(n_in, n_out, bias=False)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def recomputed(fn, *args, when: bool):
    """``fn(*args)``, recomputed in backward instead of keeping its intermediates when ``when``
    (and autograd is on): the same ops run again, so the numbers are identical."""
    if when and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class LLaDABlock(nn.Module):
    """One pre-norm block: bidirectional attention then SwiGLU, each with a residual.

    ``forward(x, cos=None, sin=None, key_padding_mask=None)``: ``x`` is ``[b, s, d]``, or
    ``[s, b, d]`` with ``sequence_first``; without ``cos``/``sin`` the RoPE tables are made for
    positions ``0..s-1``.

    Seams for ``train.parallelize`` (defaults = one device): ``linear(n_in, n_out, kind)`` builds
    the projections (see :func:`plain_linear`; a tensor-parallel factory returns modules whose
    ``forward`` returns the local output tensor); ``shards`` = how many ranks split the heads and
    the SwiGLU width (this block holds ``n_heads / shards`` query heads and
    ``n_kv_heads / shards`` key/value heads); ``sequence_first`` = the ``[s, b, d]`` layout.
    Parameter names are the same in every case (``q_proj.weight``, ...).

    Activation checkpointing (set by :meth:`LLaDAModel.set_activation_checkpointing` or the
    parallel builder): ``checkpointing`` is ``none``, ``selective`` (recompute the attention core
    and the SwiGLU product) or ``full`` (recompute the whole block from its input);
    ``recompute_elementwise`` also recomputes RMSNorm and silu·up in backward (keeps their bf16
    inputs instead of fp32 intermediates; identical numbers; off under ``full``).
    """

    def __init__(
        self, config: ModelConfig, *, linear=plain_linear, shards: int = 1, sequence_first: bool = False
    ) -> None:
        super().__init__()
        d, kv, f = config.d_model, config.kv_dim, config.mlp_hidden_size
        self.n_heads, self.n_kv_heads = config.n_heads // shards, config.n_kv_heads // shards
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.sequence_first = sequence_first
        # attribute order = LLaDA's, so state dicts list names in its order
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = linear(d, d, "column")
        self.k_proj = linear(d, kv, "column")
        self.v_proj = linear(d, kv, "column")
        self.attn_out = linear(d, d, "row")
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = linear(d, f, "column")  # the SwiGLU gate (SiLU is applied to it)
        self.up_proj = linear(d, f, "column")
        self.ff_out = linear(f, d, "row")  # the down projection
        self.attention_backend = "auto"
        self.checkpointing = "none"
        self.recompute_elementwise = False

    # ----- layout: [b, s, d] or [s, b, d] <-> heads [b, n, s, head_dim] ---------------------------
    def _split_heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        if self.sequence_first:
            s, b = t.shape[:2]
            return t.view(s, b, n, self.head_dim).permute(1, 2, 0, 3)
        b, s = t.shape[:2]
        return t.view(b, s, n, self.head_dim).transpose(1, 2)

    def _merge_heads(self, a: torch.Tensor) -> torch.Tensor:
        b, s = a.shape[0], a.shape[2]
        if self.sequence_first:
            return a.permute(2, 0, 1, 3).reshape(s, b, -1)
        return a.transpose(1, 2).reshape(b, s, -1)

    # ----- the parts that checkpointing recomputes ------------------------------------------------
    def _attention(self, q, k, v, key_padding_mask):
        return attention(q, k, v, key_padding_mask, backend=self.attention_backend)

    def _swiglu(self, m: torch.Tensor) -> torch.Tensor:
        # with recompute_elementwise keep gate and up, not silu(gate) as well (-2·s·b·f/t bytes)
        return recomputed(silu_mul, self.ff_proj(m), self.up_proj(m), when=self._elementwise())

    def _elementwise(self) -> bool:
        return self.recompute_elementwise and self.checkpointing != "full"

    def _norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        # with recompute_elementwise keep the bf16 input, not RMSNorm's fp32 copies (-8·s·b·h/t bytes)
        return recomputed(norm, x, when=self._elementwise())

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.checkpointing == "full" and torch.is_grad_enabled():
            return checkpoint(self._block, x, cos, sin, key_padding_mask, use_reentrant=False)
        return self._block(x, cos, sin, key_padding_mask)

    def _block(self, x, cos, sin, key_padding_mask) -> torch.Tensor:
        selective = self.checkpointing == "selective"
        n = self._norm(self.attn_norm, x)
        q = self._split_heads(self.q_proj(n), self.n_heads)
        k = self._split_heads(self.k_proj(n), self.n_kv_heads)
        v = self._split_heads(self.v_proj(n), self.n_kv_heads)
        if cos is None:  # positions 0..s-1 (s of the heads: the whole sequence under sequence parallelism)
            b, s = q.shape[0], q.shape[2]
            cos, sin = rope_tables(torch.arange(s, device=x.device).expand(b, s), self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = recomputed(self._attention, q, k, v, key_padding_mask, when=selective)
        h = x + self.attn_out(self._merge_heads(a))
        m = self._norm(self.ff_norm, h)
        return h + self.ff_out(recomputed(self._swiglu, m, when=selective))


def lm_head(ln_f: RMSNorm, ff_out: nn.Module, x: torch.Tensor, recompute_norm: bool = False) -> torch.Tensor:
    """The head: ``ff_out(ln_f(x))`` (logits at i predict token i). ``recompute_norm`` keeps the
    input instead of RMSNorm's fp32 intermediates for backward (identical numbers)."""
    return ff_out(recomputed(ln_f, x, when=recompute_norm))


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
        (recompute every block from its input). See :class:`LLaDABlock`."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"activation checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
        self.activation_checkpointing = mode
        for block in self.transformer.blocks:
            block.checkpointing = mode

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
        for block in self.transformer.blocks:
            x = block(x, cos, sin, attention_mask)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return lm_head(self.transformer.ln_f, self.transformer.ff_out, x)


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
