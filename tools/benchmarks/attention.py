"""``python -m tools.bench attention``: non-causal attention kernels side by side.

Times every kernel ``tools.benchmarks.kernels.attention_kernels`` finds on the device (flash-attn 4/3/2
when importable, PyTorch SDPA pinned to its cuDNN / flash / memory-efficient / math backends, and
SDPA's own dispatch) at one shape, forward and forward+backward, checks each against SDPA's math
backend, and names the fastest. Full size on GPU: batch 2, 32 heads, seq 4096, head dim 128, bf16
(LLaDA-8B's attention). On CPU (or with ``--tiny``): batch 1, 4 heads, seq 256, head dim 64, fp32,
SDPA only (its own dispatch, math, and PyTorch's CPU flash kernel); the GPU kernels are listed as
unavailable with the reason.

TFLOP/s use the FlashAttention benchmark convention (``fwd = 4·B·S²·H·D``, fwd+bwd = 3.5·fwd,
the backward's recompute included) and, for fwd+bwd, also the model count (3·fwd, the
``12·L·d·s`` term of the MFU formula).
"""

from __future__ import annotations

import argparse
import sys

import torch

from model.hf import DTYPES
from tools.benchmarks.kernels import (
    attention_flops,
    attention_kernels,
    check_kernel,
    time_attention,
)
from train.device import resolve_device

FULL = dict(batch=2, heads=32, seq=4096, head_dim=128, dtype="bf16")
TINY = dict(batch=1, heads=4, seq=256, head_dim=64, dtype="fp32")


def parse(argv, description):
    p = argparse.ArgumentParser(prog="python -m tools.bench attention", description=description)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="CPU-sized shape even on a GPU")
    for k in ("batch", "heads", "seq", "head_dim"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--kernels", default=None, help="comma-separated subset (default: all available)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv, __doc__.split("\n")[0])
    try:
        device = resolve_device(args.device, "--device")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = dict(TINY if args.tiny or device.type != "cuda" else FULL)
    for k in size:
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    shape = (size["batch"], size["heads"], size["seq"], size["head_dim"])
    dtype = DTYPES[size["dtype"]]
    available, unavailable = attention_kernels(device)
    if args.kernels:
        wanted = [k.strip() for k in args.kernels.split(",") if k.strip()]
        bad = [k for k in wanted if k not in available and k not in unavailable]
        if bad:
            print(f"error: unknown kernel(s) {', '.join(bad)}", file=sys.stderr)
            return 2
        available = {k: v for k, v in available.items() if k in wanted}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    flops = attention_flops(*shape)
    print(
        f"attention bench: device {name}; B={shape[0]} H={shape[1]} S={shape[2]} D={shape[3]} {size['dtype']}, "
        f"non-causal; median of {args.repeats} after {args.warmup} warm-up"
    )
    print(f"{'kernel':<16}{'max err':>10}{'fwd ms':>10}{'fwd TF/s':>10}{'f+b ms':>10}{'f+b TF/s':>10}{'f+b model TF/s':>16}")
    results = {}
    for kname, fn in available.items():
        if kname == "sdpa_math" and device.type == "cuda" and shape[2] > 2048:
            unavailable[kname] = "skipped at this length (materializes S×S scores)"
            continue
        try:
            err = check_kernel(fn, shape, device=device, dtype=dtype, tol=5e-2)
            fwd = time_attention(fn, shape, device=device, dtype=dtype, backward=False, warmup=args.warmup, repeats=args.repeats)
            both = time_attention(fn, shape, device=device, dtype=dtype, warmup=args.warmup, repeats=args.repeats)
        except Exception as exc:
            unavailable[kname] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            continue
        results[kname] = both
        print(
            f"{kname:<16}{err:>10.1e}{fwd * 1e3:>10.3g}{flops['fwd'] / fwd / 1e12:>10.3g}{both * 1e3:>10.3g}"
            f"{flops['fwd_bwd_fa'] / both / 1e12:>10.3g}{flops['fwd_bwd_model'] / both / 1e12:>16.3g}",
            flush=True,
        )
    for kname, why in unavailable.items():
        print(f"unavailable: {kname}: {why}")
    if not results:
        print("error: no attention kernel ran", file=sys.stderr)
        return 1
    best = min(results, key=results.get)
    print(f"fastest fwd+bwd: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
