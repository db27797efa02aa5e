"""``python -m tools.bench step``: a whole training step through difftron's engine.

A reduced-depth, full-width LLaDA (GPU default: 8 layers of d 4096 / 32 heads / SwiGLU 12288
with the full 126,464-token vocabulary and head, seq 4096, i.e. 2.78B parameters) trained by
``train.local_engine.LocalEngine``: forward, masked-diffusion loss, backward over the micro-batches,
gradient clipping and the AdamW step (fp32 master weights, bf16 autocast). The micro-batches are
built like the trainer's (keyed noise, forward process, ``1/(G·L)`` row weights).

Reports tokens/s, model TFLOP/s with the bidirectional count ``ModelConfig.flops_per_token``
(``6·N_mm + 12·L·d·s``), MFU against ``train.hardware``'s peak table (n/a on CPU) and peak
memory (CUDA max allocated; on CPU the process's peak RSS). On CPU (or ``--tiny``): 4 layers of
d 256, SwiGLU 768, vocab 4096, seq 128, fp32.

Memory on GPU (8 layers): fp32 weights + grads + Adam = 44.5 GB, plus activations; with the
default micro-batch 1 × 2 micro-batches it fits an 80 GB H100 without recompute (by the
estimate in performance.md, not measured here); lower ``--layers`` if it does not.
"""

from __future__ import annotations

import argparse
import resource
import sys

import torch

from model.config import ModelConfig
from model.llada import LLaDAModel
from model.objective import draw_noise, forward_process
from tools.benchmarks.kernels import (
    KERNELS,
    apply_attention,
    choose_attention,
    time_call,
)
from train.device import compile_blocks, resolve_device
from train.engine import MicroBatch
from train.hardware import current_device_name, mfu
from train.local_engine import LocalEngine

FULL = dict(layers=8, d_model=4096, heads=32, ffn=12288, vocab=126464, seq=4096, micro_batch=1, micro_batches=2, precision="bf16")
TINY = dict(layers=4, d_model=256, heads=4, ffn=768, vocab=4096, seq=128, micro_batch=4, micro_batches=2, precision="fp32")


def model_config(size: dict) -> ModelConfig:
    v = size["vocab"]
    return ModelConfig(
        d_model=size["d_model"], n_layers=size["layers"], n_heads=size["heads"], n_kv_heads=size["heads"],
        mlp_hidden_size=size["ffn"], vocab_size=v, embedding_size=v, max_sequence_length=size["seq"],
        mask_token_id=v - 1, eos_token_id=v - 2, pad_token_id=v - 2, bos_token_id=v - 3,
    )


def make_micro_batches(config: ModelConfig, step: int, *, seq: int, micro_batch: int, count: int) -> list[MicroBatch]:
    """One step's micro-batches of random tokens, noised like ``Trainer.micro_batches``."""
    g = micro_batch * count
    tokens = torch.randint(0, config.vocab_size - 3, (g, seq), generator=torch.Generator().manual_seed(step))
    noise = draw_noise(0, step, step * g + torch.arange(g), seq, g)
    noisy, masked = forward_process(tokens, noise, config.mask_token_id)
    w = torch.full((g,), 1.0 / (g * seq))
    return [
        MicroBatch(noisy[i : i + micro_batch], tokens[i : i + micro_batch], masked[i : i + micro_batch],
                   noise.p_mask[i : i + micro_batch], w[i : i + micro_batch])
        for i in range(0, g, micro_batch)
    ]


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "process peak RSS"


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m tools.bench step", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="CPU-sized model even on a GPU")
    for k in ("layers", "d_model", "heads", "ffn", "vocab", "seq", "micro_batch", "micro_batches"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int)
    p.add_argument("--precision", choices=["bf16", "fp32"])
    p.add_argument("--attention", default="pick", help=f"'pick' (fastest measured) or one of {', '.join(KERNELS)}")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (train.device.compile_blocks)")
    p.add_argument("--checkpointing", choices=["none", "selective", "full"], default="none")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        device = resolve_device(args.device, "--device")
        size = dict(TINY if args.tiny or device.type != "cuda" else FULL)
        for k in size:
            if getattr(args, k) is not None:
                size[k] = getattr(args, k)
        config = model_config(size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seq, mbs, n_mb = size["seq"], size["micro_batch"], size["micro_batches"]
    dtype = torch.bfloat16 if size["precision"] == "bf16" else torch.float32
    try:
        choice = choose_attention(args.attention, device, (mbs, config.n_heads, seq, config.head_dim), dtype=dtype)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    with torch.device(device):  # default nn init on the device: fast at full size
        model = LLaDAModel(config)
    model.set_activation_checkpointing(args.checkpointing)
    try:
        apply_attention(model, choice)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.compile:
        compile_blocks(model)
    engine = LocalEngine(
        model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0,
        precision=size["precision"], device=device,
    )
    batches = [make_micro_batches(config, s, seq=seq, micro_batch=mbs, count=n_mb) for s in range(2)]
    state = {"step": 0, "loss": float("nan")}

    def step():
        with choice.context():
            out = engine.train_step(batches[state["step"] % 2], 1e-4)
        state["step"] += 1
        state["loss"] = out.loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_call(step, device, warmup=args.warmup, repeats=args.steps)
    tokens = mbs * n_mb * seq
    tokens_per_s = tokens / seconds
    flops_per_token = config.flops_per_token(seq)
    util = mfu(tokens_per_s, flops_per_token, 1, current_device_name() if device.type == "cuda" else None)
    mem, mem_kind = peak_memory_gb(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"step bench: device {name}; {config.n_layers} layers d={config.d_model} heads={config.n_heads} "
        f"swiglu={config.mlp_hidden_size} vocab={config.vocab_size} ({config.num_params() / 1e9:.3g}B params), "
        f"seq {seq}, {n_mb} micro-batches x {mbs}, {size['precision']}, attention {choice.name}, "
        f"compile {'on' if args.compile else 'off'}, checkpointing {args.checkpointing}, LocalEngine AdamW + clip; "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    if choice.seconds:
        print("attention pick (fwd+bwd ms): " + ", ".join(f"{k} {v * 1e3:.3g}" for k, v in sorted(choice.seconds.items(), key=lambda kv: kv[1])))
    print(f"step time: {seconds * 1e3:.4g} ms (loss {state['loss']:.4f})")
    print(f"tokens/s: {tokens_per_s:.4g}")
    print(f"model TFLOP/s: {tokens_per_s * flops_per_token / 1e12:.4g} ({flops_per_token / 1e9:.4g} GFLOP/token, bidirectional)")
    print(f"MFU: {'n/a' if util is None else f'{100 * util:.1f}%'}")
    print(f"peak memory: {mem:.3g} GB ({mem_kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
