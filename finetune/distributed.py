"""The engine a launch asked for, the one the run got, and what each process holds.

`accelerate launch` tells the processes it starts what to run through environment variables
(`ACCELERATE_USE_FSDP`, `FSDP_*`, `ACCELERATE_USE_DEEPSPEED`, ...), and `Accelerator()` turns them
into an engine. On processes without GPUs accelerate turns every multi-process launch into plain data
parallelism over gloo (`MULTI_CPU`): its state sets up FSDP only for accelerator devices
(accelerate/state.py, `AcceleratorState.__init__`), and ignores the FSDP plugin it built from the
launch file. FSDP2 itself (`fully_shard`) runs on a CPU device mesh over gloo, so `accelerator()` sets
the state accelerate sets on GPUs: the same plugin, from the same variables, and from there the same
code as on GPUs (accelerate's `fully_shard` wrapping, gradient clipping, `no_sync`, full state dict).

What cannot be had is refused with an error that says what was asked, what was found and what works;
a launch never quietly becomes a smaller one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

from .objectives import TrainingError

FSDP2_LAUNCH = "accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes N $(which gptoss-ft) train CONFIG"


class LaunchError(TrainingError):
    """The launch asked for processes or sharding this run cannot have; the message says what works."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def asked_engine() -> str | None:
    """What `accelerate launch` asked for: "FSDP2", "FSDP1", "DeepSpeed", or None (no sharding)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return f"FSDP{os.environ.get('FSDP_VERSION', '1')}"
    return None


def _refuse_a_lone_process() -> None:
    """`accelerate launch --cpu --num_processes N` runs one process (it would need --mpirun_hostfile
    for more), with MASTER_ADDR set for the N it was asked for and no WORLD_SIZE: each launch of it
    would train alone."""
    launched_for_many = "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ
    started_alone = not any(k in os.environ
                            for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if launched_for_many and started_alone:
        raise LaunchError(
            "accelerate launch --cpu was asked for several processes (it set MASTER_ADDR) but started this one "
            "alone: with --cpu, accelerate runs a single process unless given --mpirun_hostfile. The trainer "
            f"runs on the CPU by itself when there is no GPU: drop --cpu, e.g. {FSDP2_LAUNCH} "
            "(or configs/accelerate/ddp.yaml for data parallelism)")


def _die_with_the_launcher() -> None:
    """torchrun starts each process in a session of its own, so a SIGKILL of `accelerate launch` would
    leave them training, writing into the run directory beside a resumed run: ask Linux to kill this
    process when the launcher dies (PR_SET_PDEATHSIG)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the request was in place
        os._exit(1)


def accelerator(*, mixed_precision: str) -> Accelerator:
    """The Accelerator of this launch with the engine it asked for (FSDP2 also on CPU processes), or
    a LaunchError. On a machine without CUDA every process computes on its CPU over gloo."""
    _refuse_a_lone_process()
    _die_with_the_launcher()
    asked = asked_engine()
    if asked == "FSDP1":
        raise LaunchError("the launch asked for FSDP version 1; gptoss-ft shards with FSDP2 "
                          f"(fsdp_version: 2): {FSDP2_LAUNCH}")
    cpu = not torch.cuda.is_available()
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # One process may train several times (tests, a notebook): accelerate keeps the first run's
        # settings process-wide and refuses another mixed precision; a lone process starts afresh.
        AcceleratorState._reset_state()
    if asked == "DeepSpeed" and cpu:
        # accelerate's own route to DeepSpeed without GPUs: not cpu=True (which means plain DDP), but
        # a gloo process group; DeepSpeed then runs on its CPU accelerator.
        acc = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    else:
        acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    if asked == "FSDP2" and acc.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables, as Accelerator() builds it
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
        acc.state.fsdp_plugin = plugin  # the state is shared: every AcceleratorState() sees this
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if asked == "DeepSpeed" and acc.distributed_type != DistributedType.DEEPSPEED:
        raise LaunchError(f"the launch asked for DeepSpeed but the run got {describe(acc)}; "
                          f"{FSDP2_LAUNCH} shards with FSDP2")
    if asked == "FSDP2" and acc.distributed_type != DistributedType.FSDP:
        raise LaunchError(f"the launch asked for FSDP2 but the run got {describe(acc)}; {FSDP2_LAUNCH} shards")
    return acc


def is_sharded(acc: Accelerator) -> bool:
    """FSDP2 or ZeRO-3: every forward gathers weights, so every process must run the same forwards."""
    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def describe(acc: Accelerator) -> str:
    """The engine in a few words: "FSDP2, 2 processes, gloo", "DDP, 8 processes, nccl", "1 process"."""
    n = acc.num_processes
    if n == 1 and acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return "1 process"
    engine = {DistributedType.FSDP: "FSDP2", DistributedType.DEEPSPEED: "DeepSpeed ZeRO-3",
              DistributedType.MULTI_CPU: "DDP", DistributedType.MULTI_GPU: "DDP"}.get(acc.distributed_type,
                                                                                    acc.distributed_type.value)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else acc.state.backend
    return f"{engine}, {n} process{'es' if n > 1 else ''}, {backend}"


# -- what each process holds --------------------------------------------------------------------------

HELD = ("trainable", "gradients", "optimizer", "frozen")
"""What `held_per_process` measures: trainable parameters, their gradients, the optimizer's state,
frozen parameters (buffers such as MXFP4 experts are not counted: FSDP does not shard them)."""


def _storages(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor counts its local shard; views into
    one buffer count once)."""
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else getattr(t, "ds_tensor", t)  # FSDP2, ZeRO-3 partitions
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def held_per_process(model, optimizer, acc: Accelerator) -> list[dict[str, int]]:
    """Bytes each process holds, by `HELD`, one dict per process (a collective: every process calls it)."""
    params = list(acc.unwrap_model(model).parameters())
    mine = [_storages(p for p in params if p.requires_grad),
            _storages(p.grad for p in params if p.requires_grad and p.grad is not None),
            _storages(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)),
            _storages(p for p in params if not p.requires_grad)]
    every = acc.gather(torch.tensor([mine], dtype=torch.int64, device=acc.device)).cpu()  # [processes, 4]
    return [dict(zip(HELD, map(int, row))) for row in every]


def held_line(held: list[dict[str, int]]) -> str:
    mib = lambda k: " ".join(f"{h[k] / 2 ** 20:.3f}" for h in held)  # noqa: E731
    names = {"trainable": "trainable", "gradients": "gradients", "optimizer": "optimizer state",
             "frozen": "frozen weights"}
    return (f"held per process (MiB, process 0..{len(held) - 1}): "
            + "; ".join(f"{names[k]} {mib(k)}" for k in HELD))
