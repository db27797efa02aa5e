"""LLaDA for Hugging Face ``transformers`` (remote code, written for difftron).

Loads checkpoints in LLaDA's published format (``model.transformer.wte.weight``,
``model.transformer.blocks.N.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,up_proj,ff_out}.weight``,
``model.transformer.ln_f.weight``, ``model.transformer.ff_out.weight``) with::

    AutoModel.from_pretrained(path, trust_remote_code=True)          # or AutoModelForCausalLM

The network is a LLaMA-style pre-norm transformer without the causal mask:

    x = wte(input_ids)
    for each block:
        h = x + attn_out(Attention(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))   n = attn_norm(x)
        x = h + ff_out(silu(ff_proj(m)) * up_proj(m))                              m = ff_norm(h)
    logits = transformer.ff_out(ln_f(x))          # logits[i] predicts token i (no shift)

RMSNorm and RoPE (rotate-half, theta from the config) are computed in fp32; attention is
``torch.nn.functional.scaled_dot_product_attention`` without a causal mask. Unlike LLaDA's
original file this one honours ``attention_mask`` (padded keys are invisible), supports
``gradient_checkpointing_enable()``, calls ``post_init()`` and runs under transformers 4.4x-4.5x
and 5.x. There is no KV cache: diffusion sampling re-reads the whole sequence every step.

Self-contained: imports only torch and transformers.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig

try:  # transformers >= 5: initializers that skip tensors already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # transformers 4.x: from_pretrained only initializes missing modules
    _init = nn.init


class LLaDARMSNorm(nn.Module):
    """RMSNorm: normalize in fp32 (autocast off), cast back, then scale by the weight."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(position_ids, head_dim, theta):
    """fp32 cos and sin ``[B, 1, S, head_dim]`` for integer positions ``[B, S]`` (rotate-half)."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, S, head_dim/2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, head_dim]
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class LLaDALlamaBlock(nn.Module):
    """One pre-norm block: bidirectional attention, then SwiGLU; each with a residual."""

    def __init__(self, config):
        super().__init__()
        d, f = config.d_model, config.mlp_hidden_size
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = d // config.n_heads
        kv = self.n_kv_heads * self.head_dim
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, f, bias=False)  # SwiGLU gate (SiLU is applied to it)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.ff_out = nn.Linear(f, d, bias=False)  # down projection

    def forward(self, x, cos, sin, attn_mask=None):
        """x ``[B, S, d_model]``; attn_mask ``[B, 1, 1|S, S]`` (bool keep-mask or additive float) or None."""
        b, s, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        h = x + self.attn_out(a.transpose(1, 2).reshape(b, s, -1))
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDAModel(nn.Module):
    """The network; its parameters live under ``transformer`` exactly as in LLaDA's checkpoints."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_size, config.d_model),
                blocks=nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
                ln_f=LLaDARMSNorm(config.d_model, config.rms_norm_eps),
                ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),
            )
        )
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                attention_bias=None, output_hidden_states=False):
        """Returns ``(logits [B, S, embedding_size], hidden_states tuple or None)``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LLaDA: pass exactly one of input_ids and inputs_embeds")
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(s, device=x.device).expand(b, s)
        cos, sin = rope_tables(position_ids, self.config.d_model // self.config.n_heads, self.config.rope_theta)
        attn_mask = build_attention_mask(attention_mask, attention_bias, x.dtype, b, s)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        hidden_states = (x,) if output_hidden_states else None
        for block in self.transformer.blocks:
            if checkpointing:
                x = self._gradient_checkpointing_func(block.__call__, x, cos, sin, attn_mask)
            else:
                x = block(x, cos, sin, attn_mask)
            if output_hidden_states:
                hidden_states += (x,)
        logits = self.transformer.ff_out(self.transformer.ln_f(x))
        return logits, hidden_states


def build_attention_mask(attention_mask, attention_bias, dtype, batch, seq):
    """SDPA mask from a ``[B, S]`` padding mask (1 = real token) and/or an additive bias.

    Padded keys are hidden from every query; there is never a causal mask. Returns None, a bool
    ``[B, 1, 1, S]`` keep-mask, or (with ``attention_bias``) an additive float mask.
    """
    keep = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(
                f"LLaDA: attention_mask must be [batch, seq] = [{batch}, {seq}] with 1 for real tokens, "
                f"got shape {list(attention_mask.shape)}"
            )
        keep = attention_mask.to(torch.bool)[:, None, None, :]
    if attention_bias is None:
        return keep
    bias = attention_bias.to(dtype)
    if keep is not None:
        bias = bias.masked_fill(~keep, torch.finfo(dtype).min)
    return bias


class LLaDAModelLM(PreTrainedModel):
    """LLaDA masked-diffusion LM: ``forward(input_ids, attention_mask=None, ...) -> logits``.

    Logits at position i are the model's prediction for token i (no shift); masked positions hold
    ``config.mask_token_id``. ``labels`` are ignored: the diffusion loss needs the masking ratio,
    which this interface does not carry.
    """

    config_class = LLaDAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDALlamaBlock"]

    def __init__(self, config, model=None, init_params=False):
        super().__init__(config)
        self.model = model if model is not None else LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        """Fresh weights (only for tensors not loaded from a checkpoint): N(0, init_std), norms = 1."""
        std = getattr(self.config, "init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LLaDARMSNorm):
            _init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value):
        self.model.transformer.ff_out = value

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        attention_bias=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
        position_ids=None,
        **kwargs,
    ):
        """input_ids ``[B, S]``; attention_mask ``[B, S]`` (1 real, 0 pad); position_ids ``[B, S]``
        (default 0..S-1). Returns ``CausalLMOutputWithPast(logits=[B, S, embedding_size])``."""
        if use_cache or past_key_values is not None:
            raise ValueError("LLaDA has no KV cache (masked diffusion re-reads the whole sequence); use_cache must be False")
        if output_attentions:
            raise ValueError("LLaDA: output_attentions is not supported (attention runs in SDPA)")
        if labels is not None:
            warnings.warn("LLaDA: labels are ignored; the masked-diffusion loss cannot be computed here", stacklevel=2)
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if return_dict is None:
            return_dict = bool(getattr(self.config, "return_dict", True))
        logits, hidden_states = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            attention_bias=attention_bias,
            output_hidden_states=output_hidden_states,
        )
        if not return_dict:
            return (logits, hidden_states) if output_hidden_states else (logits,)
        return CausalLMOutputWithPast(logits=logits, past_key_values=None, hidden_states=hidden_states)


__all__ = ["LLaDAModelLM", "LLaDAModel", "LLaDALlamaBlock", "LLaDARMSNorm"]
