"""Process groups: ``torch.distributed`` from torchrun's environment, the backend map, timeouts.

:func:`init_distributed` starts the default group (``cpu:gloo,cuda:nccl`` on GPUs, gloo on CPU;
see :func:`process_group_backend`) and DeepSpeed's communication layer over it; megatron-core's
TP/PP/DP groups are made by ``train.layout.ParallelLayout.initialize_process_groups``; groups
DeepSpeed makes itself get the run's timeout through :func:`default_group_timeout`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from train import internals


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is up (a parallel run, or a test's world of one)."""
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def default_group_timeout(timeout_s: float | None):
    """Process groups created inside get ``timeout_s`` instead of torch's default (30 min):
    DeepSpeed's pipeline topology calls ``dist.new_group(ranks)`` without a timeout. A no-op when
    ``timeout_s`` is None (see ``train.internals.default_group_timeouts``)."""
    if timeout_s is None:
        yield
        return
    with internals.default_group_timeouts(timeout_s):
        yield


def process_group_backend(use_cuda: bool) -> str:
    """The backend of every process group: on GPUs a device map, NCCL for CUDA tensors and gloo
    for CPU tensors (a plain ``"nccl"`` group raises "No backend type associated with device type
    cpu" on the first CPU-tensor collective, whoever issues it); gloo alone on CPU. Groups created
    later without a backend (megatron's, DeepSpeed's) inherit the map from the default group."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def init_distributed(use_cuda: bool, timeout_s: float | None = None) -> None:
    """Initialize ``torch.distributed`` from torchrun's environment (no-op if already done) with
    :func:`process_group_backend`; a plain single process (no ``RANK`` in the environment)
    becomes a world of one on localhost. DeepSpeed's communication layer then wraps that group."""
    import deepspeed

    if not use_cuda:
        from train import cpu_shim

        cpu_shim.apply()
    if not dist.is_initialized() and "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from datetime import timedelta

    extra = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(use_cuda), **extra)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False, **extra)


def tp_overlap_environment() -> None:
    """megatron's tensor-parallel layers overlap their all-gather / reduce-scatter with the GEMMs
    only if CUDA runs kernels in launch order: ``CUDA_DEVICE_MAX_CONNECTIONS=1``, read when the CUDA
    context is created. Set it (unless the user did) before this process creates one."""
    if "CUDA_DEVICE_MAX_CONNECTIONS" in os.environ:
        return
    if torch.cuda.is_initialized():
        import warnings

        warnings.warn("parallel.tp > 1: set CUDA_DEVICE_MAX_CONNECTIONS=1 before CUDA starts for TP overlap", stacklevel=2)
        return
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"


def local_device(use_cuda: bool) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` (made current) on GPUs, else the CPU."""
    if not use_cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device
