"""Training checkpoints: sharded parallel saves and resharding loads through
``torch.distributed.checkpoint`` (DCP), ``latest``, keep-last-N, integrity, atomicity.

This module is the only code that knows the checkpoint folder layout::

    <out_dir>/checkpoints/
        step_00000100/
            dcp/.metadata       DCP's index: every tensor's global shape and its stored chunks
            dcp/__R_0.distcp    the chunks rank R wrote (one file per rank, written in parallel)
            dcp/checksums.json  CRC-32 of every stored chunk, computed by the rank that wrote it
            state.json          step, schedule position, data-loader state, guard state
            rng.pt              torch RNG state (weights_only-loadable)
            config.yaml         the resolved run config
            tokenizer/          the tokenizer files, so the checkpoint describes itself
            manifest.json       format version; size and CRC-32 of every small file; size of
                                every data file (written last, by rank 0)
        latest                  the name of the newest complete checkpoint

**What is stored.** Full-model tensors under layout-free names: ``model/NAME`` (fp32 weights,
LLaDA names), ``optim/NAME/exp_avg``, ``optim/NAME/exp_avg_sq`` and ``optim/step``. Each engine
describes the pieces its rank holds as rectangular :class:`Chunk` s of those full tensors (a TP
shard is one chunk; a ZeRO partition, a 1-D range of the flattened TP shard, is at most three
chunks per tensor, see :func:`flat_range_chunks`). DCP writes every rank's chunks into that
rank's own file in parallel (DP replicas of the same chunk are written once, by one rank) and
on load each rank asks only for its own chunks: DCP's planner maps them onto the stored chunks
by overlap and each rank reads only those byte ranges. So any layout resumes any other.

**Atomicity.** All ranks write into ``step_X.tmp-<token>``; when DCP's save returns, every
rank's file is complete and rank 0 has written ``.metadata``; rank 0 then writes the small
files and ``manifest.json`` and renames the folder into place, then replaces ``latest``
(atomically). A kill at any moment leaves the previous checkpoint usable; stale ``.tmp-``
folders are removed at the next start (:func:`remove_stale_temporaries`) and after a failed save.

**Integrity.** Each rank computes the CRC-32 of every chunk it wrote (reading its own file back
once) and DCP hands those to rank 0, which records them in ``checksums.json``. Every reader
(resume, ``init_from``, ``tools.convert_to_hf``, ``tools.generate``) checks the CRC-32 of each
chunk it reads before using it (:class:`_Reader`); :func:`verify_checkpoint` checks the small
files and the data files' sizes without reading the data. DCP's ``.metadata`` is a pickle: it is
read with an unpickler that only admits DCP's metadata classes.

**A run's checkpoints.** :class:`Checkpointer` is what the trainer holds: it saves the engine's
chunks with the trainer state (data position, guard state; the background writer of
``train.async_save`` included), restores all of it (older checkpoints' missing fields filled in),
finds the resume and rollback candidates and discards a rollback's abandoned checkpoints.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from model.config import ModelConfig

if TYPE_CHECKING:
    from train.engine import Engine
    from train.guards import RunGuard

STEP_PREFIX = "step_"
MANIFEST = "manifest.json"
DATA_DIR = "dcp"
CHECKSUMS = "checksums.json"
FORMAT = "difftron-dcp"
FORMAT_VERSION = 2
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
OPTIM_STEP = "optim/step"
_CHUNK = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read (damaged, other model, disk full): one line."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` of the run in ``out_dir`` is (or will be) saved."""
    return Path(out_dir) / "checkpoints" / step_dir_name(step)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----- what a rank holds: chunks of full tensors ------------------------------------------------
@dataclass
class Chunk:
    """A rectangular piece of a full tensor: ``tensor`` (or a function returning it, for lazy
    writers) holds the elements at ``offsets`` with shape ``sizes``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    tensor: torch.Tensor | Callable[[], torch.Tensor]

    def get(self) -> torch.Tensor:
        return self.tensor() if callable(self.tensor) else self.tensor


@dataclass
class Sharded:
    """The chunks of one full tensor (global ``size``, ``dtype``) that this rank holds."""

    size: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[Chunk]


def whole(tensor: torch.Tensor) -> Sharded:
    """A tensor held entirely by this rank."""
    shape = tuple(tensor.shape)
    return Sharded(shape, tensor.dtype, [Chunk((0,) * len(shape), shape, tensor)])


def flat_range_chunks(shape: tuple[int, ...], start: int, numel: int) -> list[tuple[tuple, tuple, int, int]]:
    """Rectangles covering elements ``[start, start + numel)`` of a row-major tensor of ``shape``
    (1-D or 2-D): ``(offsets, sizes, lo, hi)`` with ``[lo, hi)`` the range's own flat slice.
    A 2-D range is at most three rectangles: a partial first row, whole rows, a partial last row."""
    if numel <= 0:
        return []
    if len(shape) == 1:
        return [((start,), (numel,), 0, numel)]
    if len(shape) != 2:
        raise ValueError(f"flat_range_chunks: only 1-D and 2-D tensors are supported, got shape {shape}")
    cols = shape[1]
    out, pos, end = [], start, start + numel
    row, col = divmod(pos, cols)
    if col:  # partial first row
        n = min(cols - col, end - pos)
        out.append(((row, col), (1, n), pos - start, pos - start + n))
        pos += n
    if end - pos >= cols:  # whole rows
        rows = (end - pos) // cols
        out.append(((pos // cols, 0), (rows, cols), pos - start, pos - start + rows * cols))
        pos += rows * cols
    if pos < end:  # partial last row
        out.append(((pos // cols, 0), (1, end - pos), pos - start, end - start))
    return out


def fragment_chunks(flat: torch.Tensor, local_shape: tuple[int, ...], start: int, base: tuple[int, ...]) -> list[Chunk]:
    """Chunks (views of ``flat``, a 1-D range of the flattened local tensor starting at element
    ``start``) placed in the full tensor at ``base`` (the local tensor's offset, e.g. its TP shard)."""
    return [
        Chunk(tuple(b + o for b, o in zip(base, offsets)), sizes, flat[lo:hi].view(sizes))
        for offsets, sizes, lo, hi in flat_range_chunks(tuple(local_shape), start, flat.numel())
    ]


# ----- DCP planners, writer, reader ------------------------------------------------------------
def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def _make_planners():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    from train.internals import dcp_read_items, dcp_write_items

    def find_chunk(obj: Sharded, index) -> Chunk:
        if index.index is not None and index.index < len(obj.chunks):
            c = obj.chunks[index.index]
            if tuple(c.offsets) == tuple(index.offset):
                return c
        for c in obj.chunks:
            if tuple(c.offsets) == tuple(index.offset):
                return c
        raise KeyError(f"no chunk of {index.fqn} at {tuple(index.offset)}")

    class SavePlanner(DefaultSavePlanner):
        """Write items for :class:`Sharded` chunks (DCP dedups equal chunks across ranks)."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def create_local_plan(self):
            items = []
            for fqn, obj in self.state_dict.items():
                if isinstance(obj, Sharded):
                    props = TensorProperties(dtype=obj.dtype)
                    for c in obj.chunks:
                        offsets = torch.Size(c.offsets)
                        items.append(WriteItem(
                            index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                            tensor_data=TensorWriteData(
                                chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(c.sizes)),
                                properties=props, size=torch.Size(obj.size),
                            ),
                        ))
                else:
                    items += dcp_write_items(fqn, obj)
            self.plan = SavePlan(items)
            return self.plan

        def lookup_object(self, index):
            obj = self.state_dict[index.fqn]
            if isinstance(obj, Sharded):
                return find_chunk(obj, index).get()
            return super().lookup_object(index)

    class LoadPlanner(DefaultLoadPlanner):
        """Read items for :class:`Sharded` destinations: each chunk gets the overlapping parts of
        the stored chunks, whatever layout wrote them."""

        def __init__(self, where: str) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.where = where

        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
            self.original_state_dict = self.state_dict = state_dict
            self.metadata, self.is_coordinator = metadata, is_coordinator

        def create_local_plan(self):
            requests = []
            stored = self.metadata.state_dict_metadata
            for fqn, obj in self.state_dict.items():
                md = stored.get(fqn)
                if md is None:
                    raise CheckpointError(f"{self.where} has no tensor {fqn!r} (a checkpoint of another model?)")
                size = tuple(obj.size) if isinstance(obj, Sharded) else tuple(obj.shape)
                if tuple(getattr(md, "size", ())) != size:
                    raise CheckpointError(
                        f"{self.where}: {fqn} has shape {tuple(md.size)} in the checkpoint, the model {size} "
                        "(a checkpoint of another model?)"
                    )
                if isinstance(obj, Sharded):
                    local = [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in obj.chunks]
                    requests += create_read_items_for_chunk_list(fqn, md, local)
                else:
                    requests += dcp_read_items(fqn, md, obj)
            return LoadPlan(requests)

        def lookup_tensor(self, index):
            obj = self.state_dict[index.fqn]
            if isinstance(obj, Sharded):
                return find_chunk(obj, index).get()
            return super().lookup_tensor(index)

    return SavePlanner, LoadPlanner


def _crc_of_range(path: Path, offset: int, length: int) -> int:
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            block = f.read(min(_CHUNK, left))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            left -= len(block)
    return crc


def _make_writer(path: Path):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.storage import WriteResult

    class Writer(FileSystemWriter):
        """DCP's file writer; each rank also returns the CRC-32 of every chunk it wrote, and the
        coordinator records them in ``checksums.json`` before DCP writes ``.metadata``."""

        def __init__(self) -> None:
            super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=False)

        def write_data(self, plan, planner):
            results = super().write_data(plan, planner).wait()
            checked = []
            for wr in results:
                info = wr.storage_data
                crc = _crc_of_range(path / info.relative_path, info.offset, info.length)
                checked.append(WriteResult(index=wr.index, size_in_bytes=wr.size_in_bytes, storage_data=(info, crc)))
            from torch.futures import Future

            fut: Future = Future()
            fut.set_result(checked)
            return fut

        def finish(self, metadata, results) -> None:
            sums: dict[str, dict[str, list[int]]] = {}
            plain = []
            for per_rank in results:
                out = []
                for wr in per_rank:
                    info, crc = wr.storage_data
                    sums.setdefault(info.relative_path, {})[str(info.offset)] = [info.length, crc]
                    out.append(WriteResult(index=wr.index, size_in_bytes=wr.size_in_bytes, storage_data=info))
                plain.append(out)
            (path / CHECKSUMS).write_text(json.dumps({"algorithm": "crc32", "files": sums}))
            super().finish(metadata, plain)

    return Writer()


_METADATA_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, ``torch.Size`` and dtypes/layouts/memory formats only."""

    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES:
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if name == "Size" or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        if (module, name) in {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                              ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} (not DCP metadata)")


def _make_reader(path: Path, checksums: dict, cached=None):
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        """DCP's file reader; every chunk's bytes are checked against their CRC-32 before use."""

        def read_metadata(self, *args, **kwargs):
            if cached is not None:  # read once by the caller (one tensor at a time readers)
                return cached
            meta = path / ".metadata"
            try:
                with open(meta, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except FileNotFoundError:
                raise CheckpointError(f"{meta} is missing") from None
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
                raise CheckpointError(f"{meta} is unreadable ({e})") from None
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            if metadata.planner_data is None:
                metadata.planner_data = {}
            return metadata

        def _slice_file(self, file, sinfo):
            name = path / sinfo.relative_path
            file.seek(sinfo.offset)
            data = file.read(sinfo.length)
            if len(data) != sinfo.length:
                raise CheckpointError(f"{name} is truncated (chunk at byte {sinfo.offset} incomplete)")
            want = checksums.get(sinfo.relative_path, {}).get(str(sinfo.offset))
            if want is None:
                raise CheckpointError(f"{path / CHECKSUMS} has no checksum for {name} at byte {sinfo.offset}")
            if zlib.crc32(data) != want[1]:
                raise CheckpointError(f"{name} fails its CRC-32 check at byte {sinfo.offset} (corrupted)")
            return io.BytesIO(data)

    return Reader(path)


def _unwrap(err: BaseException) -> BaseException:
    """The first real error inside DCP's ``CheckpointException`` (which collects every rank's)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        for rank in sorted(failures):
            inner = failures[rank]
            inner = getattr(inner, "exception", inner[0] if isinstance(inner, tuple) else inner)
            if isinstance(inner, CheckpointError):
                return inner
        for rank in sorted(failures):
            inner = failures[rank]
            return getattr(inner, "exception", inner[0] if isinstance(inner, tuple) else inner)
    return err


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


_GROUP: dict = {}


def checkpoint_group():
    """A gloo group of all ranks for checkpoint coordination (so background saves never share a
    communicator with training collectives). Collective on first use; None without distributed."""
    if not _distributed():
        return None
    key = (dist.get_world_size(), id(dist.group.WORLD))
    if key not in _GROUP:
        _GROUP.clear()
        _GROUP[key] = dist.new_group(backend="gloo")
    return _GROUP[key]


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _agree(ok: bool, group) -> bool:
    """True on every rank iff ``ok`` on every rank (collective)."""
    if not _distributed():
        return ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag) == 0


# ----- saving ----------------------------------------------------------------------------------
def stage(state: dict) -> dict:
    """A CPU copy of every chunk (the blocking part of an async save: device-to-host only)."""
    out = {}
    for fqn, obj in state.items():
        if isinstance(obj, Sharded):
            out[fqn] = Sharded(obj.size, obj.dtype, [
                Chunk(c.offsets, c.sizes, c.get().detach().to("cpu", copy=True)) for c in obj.chunks
            ])
        else:
            out[fqn] = obj.detach().to("cpu", copy=True)
    return out


def _planned_bytes(state: dict) -> int:
    total = 0
    for obj in state.values():
        if isinstance(obj, Sharded):
            item = torch.empty((), dtype=obj.dtype).element_size()
            total += sum(item * _numel(c.sizes) for c in obj.chunks)
        else:
            total += obj.numel() * obj.element_size()
    return total


def _numel(sizes) -> int:
    n = 1
    for s in sizes:
        n *= int(s)
    return n


def _disk_full_message(folder: Path, need: int) -> str:
    try:
        free = shutil.disk_usage(folder.parent).free
    except OSError:
        free = -1
    return (
        f"disk full while saving checkpoint {folder}: it needs about {need} bytes "
        f"({need / 1e9:.3f} GB), {free} bytes are free; free space or set train.keep_last lower"
    )


def _is_disk_full(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "iostream error" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    state: dict,
    trainer_state: dict,
    config_yaml: str,
    tokenizer_dir: str | os.PathLike | None,
    keep_last: int = 3,
    rng: bool = True,
) -> Path:
    """Write a checkpoint from every rank in parallel and point ``latest`` at it. Collective:
    every rank calls it with its own ``state`` (``{key: Sharded | tensor}``, see the module
    docstring); ``trainer_state`` etc. are used on rank 0. Returns the checkpoint folder.
    Any failure on any rank raises :class:`CheckpointError` (one line) on every rank, leaves
    ``latest`` and older checkpoints untouched and removes the temporary folder."""
    SavePlanner, _ = _make_planners()
    group = checkpoint_group()
    root = Path(out_dir) / "checkpoints"
    final = root / step_dir_name(step)
    token = torch.tensor([os.getpid()], dtype=torch.int64)
    if _distributed():
        dist.broadcast(token, src=0, group=group)
    tmp = root / f"{final.name}.tmp-{int(token)}"
    rank0 = _rank() == 0
    error: BaseException | None = None
    try:
        if rank0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / DATA_DIR).mkdir(parents=True)
    except OSError as e:
        error = e
    if not _agree(error is None, group):
        raise _save_error(error, final, tmp, state, group, rank0)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.filterwarnings("ignore", message=".*single process.*")
            _dcp().save(state, storage_writer=_make_writer(tmp / DATA_DIR), planner=SavePlanner(),
                        process_group=group, no_dist=not _distributed())
    except BaseException as e:  # CheckpointException is a BaseException; it reaches every rank
        if isinstance(e, KeyboardInterrupt) and not hasattr(e, "failures"):
            raise
        raise _save_error(_unwrap(e), final, tmp, state, group, rank0) from None
    try:
        if rank0:
            if rng:
                torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
            (tmp / "config.yaml").write_text(config_yaml)
            if tokenizer_dir is not None:
                shutil.copytree(tokenizer_dir, tmp / "tokenizer")
            _write_manifest(tmp)
            if final.exists():  # re-saving the same step (e.g. after a rollback): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(root / "latest", final.name)
    except BaseException as e:
        error = e
    if not _agree(error is None, group):
        raise _save_error(error, final, tmp, state, group, rank0)
    if rank0:
        _prune(root, keep_last)
    return final


def _save_error(error, final: Path, tmp: Path, state: dict, group, rank0: bool) -> CheckpointError:
    """One line for a failed save (every rank); the temporary folder is removed by rank 0."""
    need = torch.tensor([_planned_bytes(state)], dtype=torch.int64)
    if _distributed():
        dist.all_reduce(need, group=group)  # an upper bound: DP replicas are written once
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        return CheckpointError(f"saving checkpoint {final} failed on another rank (see its log)")
    if isinstance(error, CheckpointError):
        return error
    if _is_disk_full(error):
        return CheckpointError(_disk_full_message(final, int(need)))
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CheckpointError(f"saving checkpoint {final} failed: {type(error).__name__}: {first}")


class AsyncSave:
    """A checkpoint being written in the background (``train.async_save``): the chunks were
    copied to CPU (:func:`stage`) before the call returned; :meth:`wait` re-raises any error on
    every rank (collective)."""

    def __init__(self, out_dir, step: int, state: dict, **kwargs) -> None:
        self.path = checkpoint_path(out_dir, step)
        self.error: BaseException | None = None
        staged = stage(state)
        checkpoint_group()  # created here, by every rank, before the thread starts

        def run() -> None:
            try:
                save_checkpoint(out_dir, step, state=staged, **kwargs)
            except BaseException as e:  # re-raised by wait()
                self.error = e

        self.thread = threading.Thread(target=run, name=f"save-step-{step}", daemon=False)
        self.thread.start()

    def wait(self) -> Path:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.path


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(folder: Path) -> None:
    """The format version, size and CRC-32 of every small file and the size of every data file."""
    files, data = {}, {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name == MANIFEST:
            continue
        rel = f.relative_to(folder).as_posix()
        if f.suffix == ".distcp":
            data[rel] = {"size": f.stat().st_size}
        else:
            files[rel] = {"size": f.stat().st_size, "crc32": _crc32(f)}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "algorithm": "crc32", "files": files, "data": data}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


# ----- checking and finding checkpoints --------------------------------------------------------
def verify_checkpoint(ckpt: Path) -> str | None:
    """None when ``ckpt`` is a complete checkpoint of this format: its manifest is readable, every
    small file has the recorded size and CRC-32 and every data file the recorded size (the data's
    own CRCs are checked by whoever reads it); otherwise one line naming the first problem."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        if (ckpt / "model.safetensors").is_file():
            return (f"{ckpt} is in the old unsharded format (model.safetensors), which this version no "
                    "longer reads; convert it with an older difftron (tools.convert_to_hf) and back")
        return f"{manifest} is missing (an incomplete save?)"
    try:
        info = json.loads(manifest.read_text())
        files, data, version = info["files"], info.get("data", {}), info.get("version")
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is unreadable"
    if info.get("format") != FORMAT or version != FORMAT_VERSION:
        return (f"{manifest}: unknown checkpoint format {info.get('format')!r} version {version!r} "
                f"(this difftron reads {FORMAT!r} version {FORMAT_VERSION})")
    for rel, want in data.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want["size"]:
            return f"{f} has {f.stat().st_size} bytes, expected {want['size']} (truncated?)"
    for rel, want in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f} has {size} bytes, expected {want['size']} (truncated?)"
        if _crc32(f) != want["crc32"]:
            return f"{f} fails its CRC-32 check (corrupted)"
    return None


def newest_valid_checkpoint(out_dir: str | os.PathLike, log=print) -> Path | None:
    """The newest checkpoint (``latest`` first, then older ones) that passes :func:`verify_checkpoint`.
    Each rejected one is reported through ``log`` in one line."""
    for ckpt in resume_candidates(out_dir):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log(f"resume: skipping damaged checkpoint {ckpt.name}: {problem}")
    return None


def resume_candidates(out_dir: str | os.PathLike) -> list[Path]:
    """``latest`` first, then the older checkpoints, newest first (unchecked)."""
    newest = latest_checkpoint(out_dir)
    if newest is None:
        return []
    return [newest] + [p for p in reversed(list_checkpoints(out_dir)) if p.name < newest.name]


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and ".tmp-" not in p.name)
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(out_dir: str | os.PathLike, log=print) -> list[Path]:
    """Delete ``step_X.tmp-*`` folders left by a killed or failed save (call on one rank, before
    any save of this run). Returns what was removed."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and ".tmp-" in p.name)
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if stale:
        log(f"checkpoints: removed {len(stale)} unfinished save(s): {', '.join(p.name for p in stale)}")
    return stale


def discard_checkpoints_after(out_dir: str | os.PathLike, keep: Path) -> None:
    """Delete the checkpoints newer than ``keep`` (a rollback's abandoned timeline)."""
    for ckpt in list_checkpoints(out_dir):
        if ckpt.name > keep.name:
            shutil.rmtree(ckpt, ignore_errors=True)


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run (finished saves, not checked), oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and ".tmp-" not in p.name)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest``, else the newest one; None for a run with none.
    ``latest`` that is not a file, or that names a missing folder when no other checkpoint is
    left, is a :class:`CheckpointError` (never a silent fresh start)."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    found = list_checkpoints(out_dir)
    if pointer.exists() and not pointer.is_file():
        raise CheckpointError(f"{pointer} is not a file (it should hold the newest checkpoint's name)")
    if pointer.is_file():
        name = pointer.read_text().strip()
        candidate = root / name
        if name and "/" not in name and candidate.is_dir():
            return candidate
        if not found:
            raise CheckpointError(
                f"{pointer} names {name!r}, which does not exist, and {root} holds no other checkpoint; "
                f"refusing to start from step 0 (delete {pointer} to start a new run)"
            )
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints`` folder or a run folder."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / DATA_DIR).is_dir() or (path / "model.safetensors").is_file():
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    found = latest_checkpoint(run_dir)
    if found is not None:
        return found
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise FileNotFoundError(f"no checkpoint in {path} (expected {MANIFEST} or checkpoints/latest)")


def checked_checkpoint(path: str | os.PathLike) -> Path:
    """:func:`resolve_checkpoint`, then :func:`verify_checkpoint`: a :class:`CheckpointError` if damaged."""
    ckpt = resolve_checkpoint(path)
    problem = verify_checkpoint(ckpt)
    if problem is not None:
        raise CheckpointError(f"damaged checkpoint {ckpt}: {problem}")
    return ckpt


def read_model_config(ckpt: Path) -> ModelConfig:
    cfg_file = ckpt / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"checkpoint has no config.yaml: {ckpt}")
    raw = OmegaConf.to_container(OmegaConf.load(cfg_file))
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"{cfg_file}: no 'model' section")
    return ModelConfig.from_dict(raw["model"])


# ----- loading ---------------------------------------------------------------------------------
def _checksums(ckpt: Path) -> dict:
    f = ckpt / DATA_DIR / CHECKSUMS
    try:
        return json.loads(f.read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{f} is missing") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{f} is unreadable") from None


def load_state(ckpt: Path, state: dict, *, distributed: bool | None = None, _cache: tuple | None = None) -> None:
    """Fill ``state`` (``{key: Sharded | tensor}``: this rank's chunks, any layout) from ``ckpt``;
    each rank reads only the stored byte ranges that overlap its chunks and checks their CRC-32.
    Collective when distributed (every rank calls it). :class:`CheckpointError` (one line, on
    every rank) for a damaged checkpoint, a missing tensor or a shape of another model."""
    _, LoadPlanner = _make_planners()
    use_dist = _distributed() if distributed is None else distributed
    checksums, metadata = _cache if _cache is not None else (_checksums(ckpt), None)
    reader = _make_reader(ckpt / DATA_DIR, checksums, metadata)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            _dcp().load(state, storage_reader=reader, planner=LoadPlanner(str(ckpt)),
                        process_group=checkpoint_group() if use_dist else None, no_dist=not use_dist)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) and not hasattr(e, "failures"):
            raise
        inner = _unwrap(e)
        if isinstance(inner, CheckpointError):
            raise CheckpointError(str(inner)) from None
        first = str(inner).splitlines()[0] if str(inner) else type(inner).__name__
        if isinstance(inner, FileNotFoundError):
            raise CheckpointError(f"damaged checkpoint {ckpt}: {inner.filename or first} is missing") from None
        raise CheckpointError(f"reading checkpoint {ckpt} failed: {type(inner).__name__}: {first}") from None


def stored_tensors(ckpt: Path, prefix: str = MODEL_PREFIX) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name without prefix: (shape, dtype)}`` of the stored tensors under ``prefix`` (metadata only)."""
    metadata = _make_reader(ckpt / DATA_DIR, {}).read_metadata()
    out = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(md, "size"):
            out[key[len(prefix):]] = (tuple(md.size), md.properties.dtype)
    return out


def iter_model_tensors(ckpt: Path, names) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` one at a time (single process; memory about one tensor)."""
    shapes = stored_tensors(ckpt)
    cache = (_checksums(ckpt), _make_reader(ckpt / DATA_DIR, {}).read_metadata())
    for name in names:
        if name not in shapes:
            raise CheckpointError(f"{ckpt} has no tensor {name!r}")
        shape, dtype = shapes[name]
        full = torch.empty(shape, dtype=dtype)
        load_state(ckpt, {MODEL_PREFIX + name: whole(full)}, distributed=False, _cache=cache)
        yield name, full


def load_model_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, full state dict) of a checkpoint, run folder or checkpoint folder, checked
    (manifest and every chunk's CRC-32). Single process; for inference and conversion."""
    ckpt = checked_checkpoint(path)
    shapes = stored_tensors(ckpt)
    state = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}
    load_state(ckpt, {MODEL_PREFIX + k: whole(v) for k, v in state.items()}, distributed=False)
    return read_model_config(ckpt), state


def load_training_state_json(ckpt: Path) -> dict:
    """Only ``state.json`` of a checkpoint (step, data position, guard state)."""
    return json.loads((ckpt / "state.json").read_text())


def has_optimizer_state(ckpt: Path) -> bool:
    return bool(stored_tensors(ckpt, OPTIM_PREFIX))


def load_rng(ckpt: Path) -> dict | None:
    return torch.load(ckpt / "rng.pt", weights_only=True) if (ckpt / "rng.pt").is_file() else None


def tokenizer_dir_of(ckpt: Path) -> Path | None:
    tok = ckpt / "tokenizer"
    return tok if tok.is_dir() else None


def load_into_engine(ckpt: Path, engine, *, optimizer: bool = True) -> None:
    """Load a checkpoint's weights (and AdamW state) into an engine of any layout: each rank
    reads only its own chunks (``engine.checkpoint_state``). Collective."""
    if optimizer and not has_optimizer_state(ckpt):
        raise CheckpointError(f"checkpoint {ckpt} has no optimizer state (e.g. it was converted from HF)")
    state = engine.checkpoint_state(optimizer=optimizer)
    load_state(ckpt, state)
    engine.finish_checkpoint_load(state)


# ----- a run's checkpoints ---------------------------------------------------------------------
class Checkpointer:
    """The checkpoints of the run in ``out_dir``: the engine's chunks, the data loader's position
    and the guard's run state (``train.guards.RunGuard``) saved together, restored together.
    Collective methods must be called by every rank; files outside the DCP write are touched by
    the logging rank only."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        engine: "Engine",
        *,
        loader,
        run_guard: "RunGuard",
        model_config: ModelConfig,
        config_yaml: str,
        keep_last: int,
        async_save: bool,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.engine, self.loader, self.run_guard = engine, loader, run_guard
        self.model_config = model_config
        self.config_yaml = config_yaml
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: AsyncSave | None = None
        checkpoint_group()  # made now, while the launcher's store is there (see the trainer)

    @property
    def where(self) -> Path:
        return self.out_dir / "checkpoints"

    # ----- saving -----------------------------------------------------------------------------
    def trainer_state(self, data_step: int) -> dict:
        """``state.json``'s fields besides ``step``: the loader's position, the next data step and
        the guard's run state."""
        loader = self.loader.state_dict()
        loader["next_step"] = data_step
        return {"loader": loader, "data_step": data_step, **self.run_guard.state_dict()}

    def save(self, step: int, data_step: int) -> Path:
        """Write the checkpoint of ``step`` (collective). Under ``async_save`` only the copy of
        this rank's chunks to CPU blocks; the write runs in the background and ``latest`` moves
        when every rank's part is written. At most one save is in flight."""
        self.wait()
        kwargs = dict(
            trainer_state=self.trainer_state(data_step), config_yaml=self.config_yaml,
            tokenizer_dir=self.loader.tokenizer_path, keep_last=self.keep_last,
        )
        if self.async_save:
            self._pending = AsyncSave(self.out_dir, step, self.engine.checkpoint_state(), **kwargs)
            return self._pending.path
        return save_checkpoint(self.out_dir, step, state=self.engine.checkpoint_state(), **kwargs)

    def wait(self) -> None:
        """Block until a background write has finished; re-raise its error if any (collective)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    # ----- restoring --------------------------------------------------------------------------
    def _check_model(self, ckpt: Path, what: str) -> None:
        from train.config import ConfigError

        saved = read_model_config(ckpt)
        if saved != self.model_config:
            diff = [k for k, v in saved.to_dict().items() if getattr(self.model_config, k) != v]
            raise ConfigError(f"{what} (differs in: {', '.join(diff)})")

    def restore(self, ckpt: Path) -> tuple[int, int]:
        """Load weights, AdamW state, data position, RNG and the guard's run state from ``ckpt``;
        returns ``(step, next data step)``. Collective."""
        from train.config import ConfigError

        self._check_model(ckpt, f"checkpoint {ckpt} was written for a different model")
        trainer = load_training_state_json(ckpt)
        try:
            # weights and AdamW moments are stored as chunks of the full tensors under the model's
            # parameter names; each rank reads its own chunks, so any layout resumes any other
            load_into_engine(ckpt, self.engine)
        except CheckpointError as e:
            if "no optimizer state" not in str(e):
                raise
            raise ConfigError(
                f"checkpoint {ckpt} has no optimizer state (e.g. it was converted from HF); "
                f"start from its weights with train.init_from={ckpt} instead of train.resume"
            ) from None
        self.loader.load_state_dict(trainer["loader"])
        rng = load_rng(ckpt)
        if rng is not None:
            torch.set_rng_state(rng["torch"])
        self.run_guard.load_state_dict(trainer)
        step = int(trainer["step"])
        return step, int(trainer.get("data_step", step))

    def resume(self, log) -> tuple[Path, int, int] | None:
        """Restore the newest undamaged checkpoint (``latest`` first); a damaged one is reported
        through ``log`` (one line) and the next older one tried. ``(checkpoint, step, data step)``,
        or None for a run with no checkpoint. Collective."""
        from train.config import ConfigError

        candidates = resume_candidates(self.out_dir)  # a broken `latest` with nothing left raises
        if not candidates:
            return None
        for ckpt in candidates:
            problem = verify_checkpoint(ckpt)
            if problem is None:
                try:
                    return (ckpt, *self.restore(ckpt))  # chunk CRCs are checked as they are read, on every rank
                except CheckpointError as e:  # raised on every rank alike
                    problem = str(e)
            log(f"resume: skipping damaged checkpoint {ckpt.name}: {problem}")
        raise ConfigError(f"resume: every checkpoint in {self.where} is damaged (see above)")

    def init_from(self, path: str | os.PathLike) -> None:
        """Load only the weights of the checkpoint at ``path`` (``train.init_from``). Collective."""
        ckpt = checked_checkpoint(path)  # damaged: one line; chunk CRCs are checked as read
        self._check_model(ckpt, f"train.init_from={path} holds a different model")
        load_into_engine(ckpt, self.engine, optimizer=False)

    # ----- rollbacks --------------------------------------------------------------------------
    def saved_data_steps(self):
        """``(checkpoint, data step it was saved at)`` of the run's undamaged checkpoints, newest
        first (checked lazily, as the caller goes)."""
        for ckpt in reversed(list_checkpoints(self.out_dir)):
            try:
                trainer = load_training_state_json(ckpt)
            except (OSError, ValueError):
                continue
            if verify_checkpoint(ckpt) is None:
                yield ckpt, int(trainer.get("data_step", trainer.get("step", 0)))

    def discard_after(self, keep: Path, *, is_logging_rank: bool) -> None:
        """Delete the checkpoints newer than ``keep`` (a rollback's abandoned timeline must not
        be resumed), on the logging rank; then every rank waits for it (collective)."""
        if is_logging_rank:
            discard_checkpoints_after(self.out_dir, keep)
        if _distributed():
            dist.barrier()
