"""The LLaDA model configuration, with LLaDA's own Hugging Face key names.

Every field name below is the key LLaDA's ``config.json`` uses, so a config converts to and from
an HF export without a renaming table. Only the architecture that LLaDA actually uses is
representable: RMSNorm, SwiGLU, RoPE (rotate-half), no biases, untied head, bidirectional
attention. Fields that would select another architecture (``include_bias``, ``weight_tying``)
exist so that an HF config can be checked against them, and are rejected when set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class ModelConfig:
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads gives grouped-query attention
    mlp_hidden_size: int = 12288  # SwiGLU inner width
    vocab_size: int = 126464  # the tokenizer's id space (LLaDA: 126464)
    embedding_size: int = 126464  # rows of the embedding and of the LM head (>= vocab_size)
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    bos_token_id: int = 126080
    init_std: float = 0.02
    include_bias: bool = False  # LLaDA has no biases; kept for HF config checks only
    weight_tying: bool = False  # LLaDA's head is untied; kept for HF config checks only

    def __post_init__(self) -> None:
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            problems.append(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if (self.d_model // max(self.n_heads, 1)) % 2:
            problems.append("the head dimension must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            problems.append(
                f"embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})"
            )
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                problems.append(f"{name} ({value}) is outside the vocabulary [0, {self.vocab_size})")
        if self.include_bias:
            problems.append("include_bias=true is not LLaDA's architecture (it has no biases)")
        if self.weight_tying:
            problems.append("weight_tying=true is not LLaDA's architecture (its head is untied)")
        for name in ("d_model", "n_layers", "mlp_hidden_size", "max_sequence_length"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if problems:
            raise ValueError("model config: " + "; ".join(problems))

    # ----- derived sizes -----------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def params_per_layer(self) -> int:
        d, f = self.d_model, self.mlp_hidden_size
        attention = d * d + 2 * d * self.kv_dim + d * d  # q, k, v, attn_out
        mlp = 3 * d * f  # ff_proj (gate), up_proj, ff_out (down)
        norms = 2 * d  # attn_norm, ff_norm
        return attention + mlp + norms

    def num_params(self) -> int:
        """All parameters: embedding, blocks, final norm and the (untied) LM head."""
        embedding = self.embedding_size * self.d_model
        return embedding + self.n_layers * self.params_per_layer() + self.d_model + embedding

    def num_non_embedding_params(self) -> int:
        """LLaDA's "non-embedding" count: blocks plus the final norm (6,979,588,096 at 8B)."""
        return self.n_layers * self.params_per_layer() + self.d_model

    def num_matmul_params(self) -> int:
        """Parameters used in matrix multiplies: every linear weight including the LM head,
        excluding the embedding lookup and the norms (``N_mm`` in performance.md)."""
        d = self.d_model
        per_layer = self.params_per_layer() - 2 * d
        return self.n_layers * per_layer + self.embedding_size * d

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per trained token, forward + backward, bidirectional attention.

        ``6·N_mm + 12·L·d·s``: the attention term is not halved, because every position attends to
        all ``s`` positions (no causal mask). LLaDA-8B at s=4096 gives 51.43 GFLOP/token.
        """
        return 6.0 * self.num_matmul_params() + 12.0 * self.n_layers * self.d_model * seq_len

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {', '.join(unknown)}")
        kinds = {f.name: f.type for f in fields(cls)}  # "int", "float", "bool" (postponed annotations)
        for key, value in values.items():
            kind = kinds[key] if isinstance(kinds[key], str) else kinds[key].__name__
            ok = {
                "bool": isinstance(value, bool),
                "int": isinstance(value, int) and not isinstance(value, bool),
                "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            }.get(kind, True)
            if not ok:
                article = "an integer" if kind == "int" else "a boolean" if kind == "bool" else "a number"
                raise ValueError(f"model config: {key} must be {article}, got {value!r} ({type(value).__name__})")
        return cls(**values)
