"""Training checkpoints: trainable weights, optimizer state, RNG and data position, written atomically.

Everything tensor-valued goes to safetensors and everything else to JSON, so resuming never
unpickles. `step-N/` holds:

    state.json                   step, processes, each tensor's whole shape, optimizer scalars and
                                 param groups, what the trainer adds (data layout, elapsed time)
    shard-R-of-W.safetensors     what process R of W held: its rows of every sharded tensor (FSDP2
                                 shards parameters and their AdamW state along dim 0), every whole
                                 tensor if R is 0, and its own RNG states; the rows in its metadata

Each process writes only what it holds, so no process ever gathers another's share: for a full
fine-tune of gpt-oss-120b the fp32 AdamW state alone is 0.9 TB, which no single host could gather,
while a LoRA run's would fit anywhere; one format serves both. Resuming, each process reads the rows
it will hold (memory-mapped slices), so a checkpoint written by W processes resumes on any number.

Atomic: every process writes into `.step-N.partial/`; process 0 checks that every shard is there,
moves them with state.json into a temporary directory that is renamed to `step-N`. A kill at any
moment leaves the previous checkpoint whole, and resume takes the newest `step-N` whose
`state.json` parses. With several machines, `output_dir` must be on a filesystem they share
(process 0 refuses to commit a checkpoint whose shards it cannot see).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint import atomic_directory

STEP_RE = re.compile(r"^step-(\d+)$")
SHARD = "shard-{rank:05d}-of-{world:05d}.safetensors"
SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.safetensors$")


class StateError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path."""


def _process() -> tuple[int, int]:
    """(rank, world) of this process: (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _process()[1] > 1:
        dist.barrier()


def _rows(t: torch.Tensor) -> tuple[int, int] | None:
    """The rows [start, stop) of the whole tensor that this process holds of `t`: all of a plain
    tensor; of a DTensor, its dim-0 shard as FSDP2 cuts it (torch.chunk: ceil(n / W) rows a process,
    the last ones shorter or empty). None for a 0-d tensor (held whole)."""
    if t.dim() == 0:
        return None
    n = t.shape[0]
    if not hasattr(t, "device_mesh"):
        return 0, n
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise StateError(f"checkpoints support tensors sharded along dim 0 on one mesh dimension (FSDP2's default); "
                         f"got placements {t.placements} on a {mesh.ndim}-d mesh")
    per = -(-n // mesh.size())
    start = min(mesh.get_local_rank() * per, n)
    stop = min(start + per, n)
    if t.to_local().shape[0] != stop - start:
        raise StateError(f"a shard of {stop - start} rows was expected, found {t.to_local().shape[0]}: "
                         "not FSDP2's even split along dim 0")
    return start, stop


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "device_mesh") else t


def _optimizer_items(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]):
    """AdamW's per-parameter state keyed `name::key` by parameter name (stable across runs, unlike ids):
    (tensors, scalars)."""
    tensors, scalars = {}, {}
    for p in sorted(optimizer.state, key=lambda q: names[q]):
        for k, v in optimizer.state[p].items():
            (tensors if torch.is_tensor(v) else scalars)[f"{names[p]}::{k}"] = v
    return tensors, scalars


def _rng() -> dict[str, torch.Tensor]:
    rng = {"rng::torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"rng::torch_cuda_{i}"] = s
    return rng


def save_checkpoint(ckpt_dir: Path, step: int, *, trainable: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, param_names: dict[torch.nn.Parameter, str],
                    extra: dict, keep: int) -> Path | None:
    """Write `ckpt_dir/step-{step}` atomically, then prune to the newest `keep` checkpoints.

    Every process calls this and writes its own shard; process 0 commits and returns the path."""
    rank, world = _process()
    final = ckpt_dir / f"step-{step}"
    staging = ckpt_dir / f".step-{step}.partial"
    opt_tensors, opt_scalars = _optimizer_items(optimizer, param_names)
    everything = {**dict(sorted(trainable.items())), **opt_tensors}
    mine, rows = {}, {}
    for key, t in everything.items():
        span = _rows(t)
        if hasattr(t, "device_mesh") or rank == 0:  # a plain tensor is the same everywhere: process 0 keeps it
            mine[key] = _local(t).detach().to("cpu").contiguous()
            rows[key] = span
    mine.update(_rng())
    try:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a kill during an earlier save of this step
            staging.mkdir(parents=True)
        _barrier()
        save_file(mine, str(staging / SHARD.format(rank=rank, world=world)), metadata={"rows": json.dumps(rows)})
        _barrier()
        if rank != 0:
            return None
        shards = [SHARD.format(rank=r, world=world) for r in range(world)]
        if missing := [s for s in shards if not (staging / s).is_file()]:
            raise StateError(f"{staging}: the shards {missing[:3]} of other processes are not here; with several "
                             "machines, output_dir must be on a filesystem all of them share")
        state = {"step": step, "processes": world,
                 "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                             for k, t in everything.items()},
                 "optimizer_scalars": opt_scalars,
                 "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                 **extra}
        # A re-run of the same step after a resume replaces that checkpoint whole.
        with atomic_directory(final) as tmp:
            for s in shards:
                (staging / s).replace(tmp / s)
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        staging.rmdir()
    except OSError as e:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise StateError(f"could not write checkpoint {final}: {e.strerror or e}") from None
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not complete: fall back to the one before
        return path
    return None


class _Shards:
    """The shard files of a checkpoint, read by rows: which file holds which rows of each tensor."""

    def __init__(self, path: Path, state: dict):
        self.path = path
        world = state.get("processes")
        if world is None:
            raise StateError(f"checkpoint {path} was written by an older gptoss-ft (no shard files); "
                             "it cannot be resumed by this version")
        self.files = [safe_open(str(path / SHARD.format(rank=r, world=world)), "pt") for r in range(world)]
        self.pieces: dict[str, list[tuple[int, int | None, int | None]]] = {}  # key -> [(file, start, stop)]
        for i, f in enumerate(self.files):
            for key, span in json.loads(f.metadata()["rows"]).items():
                self.pieces.setdefault(key, []).append((i, *(span or (None, None))))
        self.shapes = {k: v["shape"] for k, v in state["tensors"].items()}

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `key` (all of them by default), from the files that hold them."""
        pieces = self.pieces.get(key, [])
        if not self.shapes[key]:  # 0-d: held whole
            return self.files[pieces[0][0]].get_tensor(key)
        n = self.shapes[key][0]
        start, stop = (0, n) if start is None else (start, stop)
        parts, at = [], start
        for i, a, b in sorted(pieces, key=lambda x: x[1]):
            if a <= at < b and at < stop:
                parts.append(self.files[i].get_slice(key)[at - a:min(stop, b) - a])
                at = min(stop, b)
        if at < stop:
            raise StateError(f"checkpoint {self.path}: rows {at}..{stop} of {key} are in none of its shard files")
        if not parts:  # this process holds none of its rows
            return torch.empty((0, *self.shapes[key][1:]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _placed_like(rows: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """This process's `rows` of a tensor shaped and placed like `ref` (a DTensor stays sharded)."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import DTensor

        local = rows.to(ref.to_local().device, ref.dtype)
        return DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False,
                                  shape=ref.shape, stride=ref.stride())
    return rows.to(ref.device, ref.dtype)


def load_checkpoint(path: Path, *, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable weights, optimizer state and RNG in place, each process reading the rows it
    holds (a checkpoint of any process count); returns state.json's content."""
    try:
        state = json.loads((path / "state.json").read_text())
        shards = _Shards(path, state)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise StateError(f"checkpoint {path} is unreadable: {e}") from None
    missing = sorted(set(params) - set(shards.shapes))
    if missing:
        raise StateError(f"checkpoint {path} lacks trainable tensors {missing[:3]} (different method or targets?)")
    for name, p in params.items():
        if list(p.shape) != shards.shapes[name]:
            raise StateError(f"checkpoint {path}: {name} is {shards.shapes[name]}, the model's is {list(p.shape)} "
                             "(another model or LoRA rank?)")
    with torch.no_grad():
        for name, p in params.items():
            _local(p).copy_(shards.read(name, *(_rows(p) or (None, None))))
    fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for name, p in params.items():
        st = {}
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if f"{name}::{key}" in shards:
                st[key] = _placed_like(shards.read(f"{name}::{key}", *(_rows(p) or (None, None))), p)
        if f"{name}::step" in shards:  # a scalar count: on the CPU, or beside the weights for fused AdamW
            st["step"] = shards.read(f"{name}::step").to(_local(p).device if fused else "cpu")
        for full, v in state.get("optimizer_scalars", {}).items():
            pname, key = full.split("::", 1)
            if pname == name:
                st[key] = v
        if st:
            optimizer.state[p] = st
    for group, saved in zip(optimizer.param_groups, state.get("param_groups", [])):
        for k, v in saved.items():
            group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    # This process's RNG: its own when the count of processes is unchanged, else that of the
    # process it replaces modulo the old count (batches differ then anyway).
    rank = _process()[0] % state["processes"]
    rng = {k.removeprefix("rng::"): shards.files[rank].get_tensor(k) for k in shards.files[rank].keys()
           if k.startswith("rng::")}
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    return state
