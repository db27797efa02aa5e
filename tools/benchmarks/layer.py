"""``python -m tools.bench layer``: one LLaDA block forward+backward, against the GEMM rate.

Runs one ``model.llada.LLaDABlock`` (weights in the compute dtype, input requiring grad, as a
middle layer) forward and backward and reports model TFLOP/s with the bidirectional count
``tokens · (6·N_mm(block) + 12·d·s)``. In the same run it measures, on the same device:

- the GEMM rate at the layer's own shapes: forward+backward of each of the block's seven linears
  (``[B·S, in] x [in, out]``, 6 FLOPs per weight per token);
- the attention kernel alone (fwd+bwd, model count 12·d·s per token);
- the composite ceiling ``layer FLOPs / (GEMM time + attention time)``;
- on GPU, a square 8192³ bf16 GEMM on random data (the device's practical matmul ceiling).

It prints ``layer / GEMM`` and ``layer / ceiling`` ratios. Full size on GPU: LLaDA-8B's block
(d 4096, 32 heads, SwiGLU 12288), seq 4096, batch 1, bf16; on CPU (or ``--tiny``): d 256,
2 heads (head dim 128), SwiGLU 768, seq 256, fp32.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.hf import DTYPES
from model.llada import LLaDABlock, rope_tables
from tools.benchmarks.kernels import (
    KERNELS,
    apply_attention,
    attention_flops,
    attention_kernels,
    choose_attention,
    time_call,
    time_interleaved,
)
from train.device import compile_blocks, resolve_device
from train.hardware import peak_flops

FULL = dict(d_model=4096, heads=32, ffn=12288, seq=4096, batch=1, dtype="bf16")
TINY = dict(d_model=256, heads=2, ffn=768, seq=256, batch=1, dtype="fp32")
TARGETS = "targets on one H100: >= 580 TFLOP/s with FA2, >= 640 with FA3/cuDNN-class attention"


def block_config(size: dict) -> ModelConfig:
    return ModelConfig(
        d_model=size["d_model"], n_layers=1, n_heads=size["heads"], n_kv_heads=size["heads"],
        mlp_hidden_size=size["ffn"], vocab_size=256, embedding_size=256, max_sequence_length=size["seq"],
        mask_token_id=2, eos_token_id=1, pad_token_id=1, bos_token_id=0,
    )


def layer_flops(config: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one block fwd+bwd: ``B·S·(6·N_mm(block) + 12·d·S)`` (bidirectional)."""
    n_mm = config.params_per_layer() - 2 * config.d_model
    return batch * seq * (6.0 * n_mm + 12.0 * config.d_model * seq)


class _Wrapper(torch.nn.Module):
    """Gives one block the ``transformer.blocks`` layout that the performance helpers expect."""

    def __init__(self, block: LLaDABlock) -> None:
        super().__init__()
        self.transformer = torch.nn.ModuleDict(dict(blocks=torch.nn.ModuleList([block])))

    def set_attention_backend(self, backend: str) -> None:
        for b in self.transformer.blocks:
            b.attention_backend = backend


def gemm_step(block: LLaDABlock, tokens: int, *, device, dtype):
    """``(fn, FLOPs)``: fn runs fwd+bwd of the block's linears at ``[tokens, in] x [in, out]``."""
    shapes = [(m.in_features, m.out_features) for m in (block.q_proj, block.k_proj, block.v_proj, block.attn_out,
                                                         block.ff_proj, block.up_proj, block.ff_out)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(tokens, i, generator=g).to(device, dtype).requires_grad_() for i, _ in shapes]
    ws = [(torch.randn(o, i, generator=g) * 0.02).to(device, dtype).requires_grad_() for i, o in shapes]
    grads = [torch.randn(tokens, o, generator=g).to(device, dtype) for _, o in shapes]

    def run():
        for x, w, gy in zip(xs, ws, grads):
            F.linear(x, w).backward(gy)
            x.grad = w.grad = None

    return run, sum(6.0 * tokens * i * o for i, o in shapes)


def square_gemm(n: int, *, device, dtype):
    """``(fn, FLOPs)``: fn runs an ``n × n × n`` matmul on random data."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    return (lambda: a @ b), 2.0 * n**3


def attention_step(fn, shape, *, device, dtype):
    """fn: forward+backward of one attention kernel on random ``[B, H, S, D]`` inputs."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=g).to(device, dtype)

    def run():
        fn(q, k, v).backward(grad)
        q.grad = k.grad = v.grad = None

    return run


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m tools.bench layer", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="CPU-sized block even on a GPU")
    p.add_argument("--d-model", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--ffn", type=int, help="SwiGLU inner width")
    p.add_argument("--seq", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--attention", default="pick", help=f"'pick' (fastest measured) or one of {', '.join(KERNELS)}")
    p.add_argument("--compile", action="store_true", help="torch.compile the block (train.device.compile_blocks)")
    p.add_argument("--checkpointing", choices=["none", "selective"], default="none")
    p.add_argument("--square", type=int, default=None, help="square GEMM size (default 8192 on GPU, 512 on CPU; 0 skips)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        device = resolve_device(args.device, "--device")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = dict(TINY if args.tiny or device.type != "cuda" else FULL)
    for key, arg in (("d_model", "d_model"), ("heads", "heads"), ("ffn", "ffn"), ("seq", "seq"), ("batch", "batch"), ("dtype", "dtype")):
        if getattr(args, arg) is not None:
            size[key] = getattr(args, arg)
    try:
        config = block_config(size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dtype, b, s, d = DTYPES[size["dtype"]], size["batch"], size["seq"], size["d_model"]
    attn_shape = (b, config.n_heads, s, config.head_dim)

    try:
        choice = choose_attention(args.attention, device, attn_shape, dtype=dtype, warmup=args.warmup, repeats=args.repeats)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    with torch.device(device):
        block = LLaDABlock(config).to(dtype)
    block.checkpointing = args.checkpointing
    wrapper = _Wrapper(block)
    try:
        apply_attention(wrapper, choice)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.compile:
        compile_blocks(wrapper)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, s, d, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(b, s, d, generator=g).to(device, dtype)
    cos, sin = rope_tables(torch.arange(s, device=device).expand(b, s), config.head_dim, config.rope_theta)

    def step():
        with choice.context():
            out = block(x, cos, sin)
        out.backward(grad)
        x.grad = None
        for p in block.parameters():
            p.grad = None

    if args.compile:  # compile outside the timed rounds
        time_call(step, device, warmup=1, repeats=1)
    flops = layer_flops(config, b, s)
    gemm, gemm_flops = gemm_step(block, b * s, device=device, dtype=dtype)
    attn = attention_step(attention_kernels(device)[0][choice.name], attn_shape, device=device, dtype=dtype)
    attn_flops = attention_flops(*attn_shape)["fwd_bwd_model"]
    square = args.square if args.square is not None else (8192 if device.type == "cuda" else 512)
    fns = {"layer": step, "gemm": gemm, "attention": attn}
    if square:
        square_fn, square_flops = square_gemm(square, device=device, dtype=dtype)
        fns["square"] = square_fn
    seconds = time_interleaved(fns, device, warmup=args.warmup, repeats=args.repeats)
    t_layer, t_gemm, t_attn = seconds["layer"], seconds["gemm"], seconds["attention"]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"layer bench: device {name}; block d={d} heads={config.n_heads} head_dim={config.head_dim} "
        f"swiglu={config.mlp_hidden_size}, batch {b} x seq {s}, {size['dtype']} weights, attention {choice.name}, "
        f"compile {'on' if args.compile else 'off'}, checkpointing {args.checkpointing}; "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up"
    )
    if choice.seconds:
        print("attention pick (fwd+bwd ms): " + ", ".join(f"{k} {v * 1e3:.3g}" for k, v in sorted(choice.seconds.items(), key=lambda kv: kv[1])))
    layer_rate = flops / t_layer
    gemm_rate = gemm_flops / t_gemm
    ceiling = flops / (t_gemm + t_attn)
    print(f"model FLOPs per layer step: {flops:.4g} (bidirectional: tokens x (6·N_mm + 12·d·s))")
    print(f"layer fwd+bwd: {t_layer * 1e3:.4g} ms, {layer_rate / 1e12:.4g} TFLOP/s")
    print(f"GEMM at layer shapes (fwd+bwd of the 7 linears): {t_gemm * 1e3:.4g} ms, {gemm_rate / 1e12:.4g} TFLOP/s")
    print(f"attention {choice.name} fwd+bwd: {t_attn * 1e3:.4g} ms, {attn_flops / t_attn / 1e12:.4g} TFLOP/s (model count)")
    print(f"composite ceiling (GEMM + attention time): {ceiling / 1e12:.4g} TFLOP/s")
    print(f"ratio layer/GEMM: {layer_rate / gemm_rate:.3f}")
    print(f"ratio layer/ceiling: {layer_rate / ceiling:.3f}")
    if square:
        rate = square_flops / seconds["square"]
        print(f"square GEMM {square}^3 {size['dtype']}: {rate / 1e12:.4g} TFLOP/s; ratio layer/square: {layer_rate / rate:.3f}")
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if peak is not None:
        print(f"layer MFU: {100 * layer_rate / peak:.1f}% of {peak / 1e12:.1f} TFLOP/s peak; {TARGETS}")
    else:
        print("layer MFU: n/a (no GPU peak for this device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
