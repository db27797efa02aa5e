"""Count the bytes each rank sends in ``torch.distributed`` collectives, by collective and by
process group (TP, DP, PP), and when gradient reductions go out relative to the backward pass.

:class:`CollectiveCounter` wraps torch.distributed's collective functions for the duration of a
``with`` block. They are replaced where they are looked up: ``torch.distributed``,
``torch.distributed.distributed_c10d`` (so torch's own composites such as ``all_gather_object``,
the ``_coalescing_manager`` fast path and ``batch_isend_irecv`` go through the wrappers), every
loaded module that imported one by name, and DeepSpeed's communication backend, which keeps
``all_gather_into_tensor``/``reduce_scatter_tensor`` in attributes
(``deepspeed.comm.comm.cdb.all_gather_function``/``reduce_scatter_function``). DeepSpeed's
``deepspeed.comm`` calls ``torch.distributed.<name>`` at call time (``all_reduce``,
``all_reduce_coalesced``, ``reduce``, ``broadcast``, ``all_gather``, ``isend``/``irecv``, ...);
megatron-core calls ``torch.distributed.<name>`` too. Only the outermost wrapped call counts
(``all_gather_into_tensor`` calls ``all_gather_single`` inside torch 2.13).

Nothing can slip past silently: a ``TorchDispatchMode`` sees every ``c10d`` operator the process
groups execute; one that runs while no wrapper is active is counted in :attr:`unwrapped`
(tests require 0).

Bytes sent per rank follow the ring algorithms (NCCL's, and nccl-tests' "bus bytes"): for a payload
of ``S`` bytes on a group of ``n`` ranks, all-reduce sends ``2·S·(n-1)/n``; reduce-scatter (``S`` =
the full input), all-gather (``S`` = the full output), reduce, broadcast, gather, scatter and
all-to-all send ``S·(n-1)/n`` (for reduce/broadcast: the group average; the root differs); a
point-to-point send sends ``S``. Groups of one rank send nothing.
"""

from __future__ import annotations

import sys
import threading
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# name -> (kind, payload function (args, kwargs) -> bytes). ``kind`` picks the send factor.
_RING2 = "all_reduce"  # 2(n-1)/n
_RING1 = "ring"  # (n-1)/n
_P2P = "send"  # S
_RECV = "recv"  # 0 sent


def _nbytes(t) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else 0


def _arg(args, kwargs, i: int, name: str):
    return args[i] if len(args) > i else kwargs.get(name)


def _sum(ts) -> int:
    return sum(_nbytes(t) for t in (ts or []))


def _tensor(i: int, name: str) -> Callable:
    """Payload = the bytes of argument ``i`` (or keyword ``name``)."""
    return lambda a, k: _nbytes(_arg(a, k, i, name))


def _tensors(i: int, name: str) -> Callable:
    """Payload = the bytes of the tensor list in argument ``i`` (or keyword ``name``)."""
    return lambda a, k: _sum(_arg(a, k, i, name))


def _all_gather_list(a, k) -> int:  # all_gather(tensor_list, tensor): the gathered output
    return _sum(_arg(a, k, 0, "tensor_list"))


def _n_copies(a, k) -> int:  # gather(tensor, gather_list, dst, group) / scatter(tensor, scatter_list, src, group)
    return _nbytes(_arg(a, k, 0, "tensor")) * dist.get_world_size(_arg(a, k, 3, "group"))


# name: (traffic kind, payload in bytes from (args, kwargs), the group argument's positional slot;
# keyword "group" wins)
COLLECTIVES: dict[str, tuple[str, Callable, int]] = {
    "all_reduce": (_RING2, _tensor(0, "tensor"), 2),
    "all_reduce_coalesced": (_RING2, _tensors(0, "tensors"), 2),
    "reduce": (_RING1, _tensor(0, "tensor"), 3),
    "reduce_scatter": (_RING1, _tensors(1, "input_list"), 3),
    "reduce_scatter_tensor": (_RING1, _tensor(1, "input"), 3),
    "reduce_scatter_single": (_RING1, _tensor(1, "input"), 3),
    "_reduce_scatter_base": (_RING1, _tensor(1, "input"), 3),
    "all_gather": (_RING1, _all_gather_list, 2),
    "all_gather_into_tensor": (_RING1, _tensor(0, "output_tensor"), 2),
    "all_gather_single": (_RING1, _tensor(0, "output_tensor"), 2),
    "_all_gather_base": (_RING1, _tensor(0, "output_tensor"), 2),
    "all_gather_coalesced": (_RING1, lambda a, k: sum(_sum(ts) for ts in (_arg(a, k, 0, "output_tensor_lists") or [])), 2),
    "broadcast": (_RING1, _tensor(0, "tensor"), 2),
    "gather": (_RING1, _n_copies, 3),
    "scatter": (_RING1, _n_copies, 3),
    "all_to_all": (_RING1, _tensors(1, "input_tensor_list"), 2),
    "all_to_all_single": (_RING1, _tensor(1, "input"), 4),
    "send": (_P2P, _tensor(0, "tensor"), 2),
    "isend": (_P2P, _tensor(0, "tensor"), 2),
    "recv": (_RECV, _tensor(0, "tensor"), 2),
    "irecv": (_RECV, _tensor(0, "tensor"), 2),
    "barrier": (_RING1, lambda a, k: 0, 0),
}
# the public name each alias is reported under
CANONICAL = {
    "reduce_scatter_single": "reduce_scatter_tensor", "_reduce_scatter_base": "reduce_scatter_tensor",
    "all_gather_single": "all_gather_into_tensor", "_all_gather_base": "all_gather_into_tensor",
    "isend": "send", "irecv": "recv",
}
GRADIENT_OPS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor")


def sent_bytes(kind: str, payload: int, n: int) -> float:
    """Bytes one rank sends for a ``payload``-byte collective of ``kind`` on ``n`` ranks (ring)."""
    if kind == _P2P:
        return float(payload)
    if n <= 1 or kind == _RECV:
        return 0.0
    return payload * (n - 1) / n * (2 if kind == _RING2 else 1)


@dataclass
class Event:
    """One counted collective on this rank."""

    op: str
    group: str  # TP, DP, PP, MP (TP×PP), world, other
    group_size: int
    payload: int  # bytes of the payload (see the module docstring)
    sent: float  # bytes this rank sends
    dtype: str
    micro_step: int  # backward passes started before it (-1: none yet)
    in_backward: bool
    grads_ready: float  # fraction of parameter elements whose gradient is accumulated, this backward


def megatron_group_names() -> dict[tuple[int, ...], str]:
    """Rank sets of megatron's TP, DP, PP and model-parallel groups for this rank -> name (later
    entries do not overwrite earlier ones: a one-rank group keeps the first name)."""
    from megatron.core import parallel_state as ps

    names: dict[tuple[int, ...], str] = {}
    if not ps.model_parallel_is_initialized():
        return names
    for name, get in (
        ("DP", ps.get_data_parallel_group),
        ("TP", ps.get_tensor_model_parallel_group),
        ("PP", ps.get_pipeline_model_parallel_group),
        ("MP", ps.get_model_parallel_group),
    ):
        ranks = tuple(sorted(dist.get_process_group_ranks(get())))
        names.setdefault(ranks, name)
    return names


class _Dispatch(TorchDispatchMode):
    """Counts c10d operators executed outside any wrapper (the counter's blind spots)."""

    def __init__(self, counter: "CollectiveCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and self.counter._depth() == 0:
            self.counter.unwrapped.append(str(func))
        return func(*args, **(kwargs or {}))


class CollectiveCounter:
    """``with CollectiveCounter() as c: ...``: every collective issued inside is recorded in
    ``c.events``. Use :meth:`track_backward` to tag events with the backward pass's progress and
    :meth:`reset` to drop what was recorded (e.g. after a warm-up step)."""

    def __init__(self, group_names: dict[tuple[int, ...], str] | None = None) -> None:
        self._group_names = group_names
        self.events: list[Event] = []
        self.unwrapped: list[str] = []
        self._local = threading.local()
        self._patched: list[tuple[object, str, object]] = []
        self._mode: _Dispatch | None = None
        self._cache: dict[int, tuple[str, int]] = {}
        # backward progress
        self.micro_step = -1
        self.in_backward = False
        self._ready = 0
        self._total = 0
        self._hooks: list = []

    # ----- wrapping ---------------------------------------------------------------------------
    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def _group(self, group) -> tuple[str, int]:
        key = id(group)
        if key not in self._cache:
            ranks = tuple(sorted(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)))
            if self._group_names is None:
                self._group_names = megatron_group_names()
            name = self._group_names.get(ranks)
            if name is None:
                name = "world" if len(ranks) == dist.get_world_size() else "other"
            self._cache[key] = (name, len(ranks))
        return self._cache[key]

    def _peer_group(self, group, peer) -> str:
        """A point-to-point op is named by the group that holds both ends (DeepSpeed's pipeline
        sends on the default group with global ranks)."""
        if peer is None:
            return "other"
        if group is not None and group is not dist.group.WORLD:
            peer = dist.get_global_rank(group, peer)
        if self._group_names is None:
            self._group_names = megatron_group_names()
        for ranks, name in self._group_names.items():
            if len(ranks) > 1 and peer in ranks and dist.get_rank() in ranks:
                return name
        return "other"

    def _wrap(self, name: str, fn):
        kind, payload_of, pos = COLLECTIVES[name]
        counter = self

        def wrapper(*args, **kwargs):
            depth = counter._depth()
            if depth == 0:
                group = kwargs.get("group", args[pos] if len(args) > pos else None)
                label, n = counter._group(group)
                if kind in (_P2P, _RECV):
                    label = counter._peer_group(group, kwargs.get("dst", kwargs.get("src", args[1] if len(args) > 1 else None)))
                payload = payload_of(args, kwargs)
                tensor = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
                if tensor is None:
                    lists = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (list, tuple)) and a]
                    tensor = next((x for lst in lists for x in lst if isinstance(x, torch.Tensor)), None)
                counter.events.append(Event(
                    op=CANONICAL.get(name, name), group=label, group_size=n, payload=payload,
                    sent=sent_bytes(kind, payload, n), dtype=str(tensor.dtype).removeprefix("torch.") if tensor is not None else "",
                    micro_step=counter.micro_step, in_backward=counter.in_backward,
                    grads_ready=counter._ready / counter._total if counter._total else 0.0,
                ))
            counter._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._local.depth = depth

        wrapper.__wrapped__ = fn
        wrapper._collective_counter = True
        return wrapper

    def _set(self, obj, attr: str, value) -> None:
        self._patched.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def __enter__(self) -> "CollectiveCounter":
        import torch.distributed.distributed_c10d as c10d

        originals = {name: getattr(c10d, name) for name in COLLECTIVES if hasattr(c10d, name)}
        wrappers = {name: self._wrap(name, fn) for name, fn in originals.items()}
        by_id = {id(fn): wrappers[name] for name, fn in originals.items()}
        self._set_everywhere(by_id)
        self._mode = _Dispatch(self)
        self._mode.__enter__()
        return self

    def _set_everywhere(self, by_id: dict[int, object]) -> None:
        """Replace every module-level reference to an original function, and DeepSpeed's backend's."""
        for mod in list(sys.modules.values()):
            d = getattr(mod, "__dict__", None)
            if not isinstance(d, dict) or not (getattr(mod, "__name__", "") or "").startswith(("torch", "deepspeed", "megatron", "train", "tools", "tests", "__main__")):
                continue
            for attr, value in list(d.items()):
                if callable(value) and id(value) in by_id:
                    self._set(mod, attr, by_id[id(value)])
        comm = sys.modules.get("deepspeed.comm.comm")
        cdb = getattr(comm, "cdb", None) if comm is not None else None
        if cdb is not None:
            for attr, value in list(vars(cdb).items()):
                if callable(value) and id(value) in by_id:
                    self._set(cdb, attr, by_id[id(value)])

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for obj, attr, value in reversed(self._patched):
            setattr(obj, attr, value)
        self._patched.clear()
        self.untrack_backward()

    def reset(self) -> None:
        self.events.clear()
        self.unwrapped.clear()
        self.micro_step = -1

    # ----- backward progress ------------------------------------------------------------------
    def track_backward(self, params: list[torch.nn.Parameter]) -> None:
        """Count how many parameter elements have their gradient accumulated in the current
        backward pass (``Tensor.register_post_accumulate_grad_hook``); :meth:`backward_started`
        and :meth:`backward_finished` bracket each backward (``micro_step`` counts them)."""
        params = [p for p in params if p.requires_grad]
        self._total = sum(p.numel() for p in params)

        def ready(p) -> None:
            self._ready += p.numel()
            if self._ready >= self._total:  # autograd has produced every gradient: backward is over
                self.in_backward = False

        self._hooks = [p.register_post_accumulate_grad_hook(ready) for p in params]

    def untrack_backward(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def backward_started(self) -> None:
        self.micro_step += 1
        self.in_backward = True
        self._ready = 0

    def backward_finished(self) -> None:
        self.in_backward = False

    # ----- summaries --------------------------------------------------------------------------
    def totals(self, events: list[Event] | None = None) -> dict[str, dict[str, dict[str, float]]]:
        """``{group: {op: {"calls", "payload", "sent"}}}`` over ``events`` (default: all)."""
        out: dict = defaultdict(lambda: defaultdict(lambda: {"calls": 0, "payload": 0, "sent": 0.0}))
        for e in self.events if events is None else events:
            cell = out[e.group][e.op]
            cell["calls"] += 1
            cell["payload"] += e.payload
            cell["sent"] += e.sent
        return {g: dict(ops) for g, ops in out.items()}

    def sent(self, group: str | None = None, ops: tuple[str, ...] | None = None) -> float:
        return sum(e.sent for e in self.events if (group is None or e.group == group) and (ops is None or e.op in ops))

    def gradient_timing(self, group: str = "DP") -> dict | None:
        """When the gradient reductions of the last backward pass went out: the fraction of
        parameter elements with accumulated gradients at the first and last reduction issued
        during that backward, and how many reductions were issued during it and after it
        (before the next backward). None if no backward was tracked."""
        if self.micro_step < 0:
            return None
        last = self.micro_step
        mine = [e for e in self.events if e.group == group and e.op in GRADIENT_OPS and e.micro_step == last and e.payload > 64]
        during = [e for e in mine if e.in_backward]
        after = [e for e in mine if not e.in_backward]
        return {
            "micro_steps": last + 1,
            "during_backward": len(during),
            "after_backward": len(after),
            "first_ready": during[0].grads_ready if during else None,
            "last_ready": during[-1].grads_ready if during else None,
            "bytes_during": sum(e.sent for e in during),
            "bytes_after": sum(e.sent for e in after),
        }

    def sent_by_micro_step(self, group: str = "DP", ops: tuple[str, ...] = GRADIENT_OPS) -> dict[int, float]:
        """Bytes sent in ``ops`` over ``group``, keyed by the backward pass they followed."""
        out: dict[int, float] = defaultdict(float)
        for e in self.events:
            if e.group == group and e.op in ops:
                out[e.micro_step] += e.sent
        return dict(out)

    def as_dicts(self) -> list[dict]:
        return [asdict(e) for e in self.events]


def bracket_backward(engine, counter: CollectiveCounter) -> Callable[[], None]:
    """Make ``engine.backward`` (a DeepSpeed engine) report each backward pass to ``counter``:
    started before autograd runs, finished when the last tracked parameter gradient is
    accumulated or ``backward`` returns, whichever comes first. Returns an undo function."""
    original = engine.backward

    def backward(*args, **kwargs):
        counter.backward_started()
        try:
            return original(*args, **kwargs)
        finally:
            counter.backward_finished()

    engine.backward = backward
    return lambda: setattr(engine, "backward", original)


__all__ = ["CollectiveCounter", "Event", "COLLECTIVES", "GRADIENT_OPS", "sent_bytes", "megatron_group_names", "bracket_backward"]
