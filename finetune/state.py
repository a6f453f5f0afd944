"""Training checkpoints: trainable weights, optimizer state, RNG and data position, written atomically.

Everything tensor-valued goes to safetensors and everything else to JSON, so resuming never
unpickles. A checkpoint is written to a temporary directory and renamed to `step-N` only when
complete; resume takes the newest `step-N` whose `state.json` parses, so a kill during a save
leaves the previous checkpoint as the one resumed from.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import atomic_directory

STEP_RE = re.compile(r"^step-(\d+)$")


class StateError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path."""


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole CPU tensor; under FSDP2 a parameter or its optimizer state is a sharded DTensor, and
    `full_tensor()` gathers it (a collective: every process calls this)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def _like(src: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`src` (whole, from disk) placed like `ref`: re-sharded when `ref` is a DTensor."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(src.to(ref.device_mesh.device_type, ref.dtype), ref.device_mesh, ref.placements)
    return src.to(ref.device, ref.dtype)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]):
    """AdamW's per-parameter state keyed by parameter name (stable across runs, unlike ids)."""
    tensors, scalars = {}, {}
    for p in sorted(optimizer.state, key=lambda q: names[q]):  # same order on every process
        for k, v in optimizer.state[p].items():
            if torch.is_tensor(v):
                tensors[f"{names[p]}::{k}"] = _full(v)
            else:
                scalars[f"{names[p]}::{k}"] = v
    return tensors, scalars


def save_checkpoint(ckpt_dir: Path, step: int, *, trainable: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, param_names: dict[torch.nn.Parameter, str],
                    extra: dict, keep: int, is_main: bool = True) -> Path | None:
    """Write `ckpt_dir/step-{step}` atomically, then prune to the newest `keep` checkpoints.

    Every process calls this (sharded tensors are gathered collectively); the main one writes.
    """
    weights = {k: _full(v) for k, v in sorted(trainable.items())}
    opt_tensors, opt_scalars = _optimizer_tensors(optimizer, param_names)
    if not is_main:
        return None
    final = ckpt_dir / f"step-{step}"
    state = {"step": step, "optimizer_scalars": opt_scalars,
             "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
             **extra}
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    try:
        # A re-run of the same step after a resume replaces that checkpoint whole.
        with atomic_directory(final) as tmp:
            save_file(weights, str(tmp / "trainable.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            save_file(rng, str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    except OSError as e:
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


def load_checkpoint(path: Path, *, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable weights, optimizer state and RNG in place; returns state.json's content."""
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        opt = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, json.JSONDecodeError) as e:
        raise StateError(f"checkpoint {path} is unreadable: {e}") from None
    missing = sorted(set(params) - set(weights))
    if missing:
        raise StateError(f"checkpoint {path} lacks trainable tensors {missing[:3]} (different method or targets?)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(_like(weights[name], p))
    for name, p in params.items():
        st = {}
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if f"{name}::{key}" in opt:
                st[key] = _like(opt[f"{name}::{key}"], p)
        if f"{name}::step" in opt:  # a scalar count, kept on the CPU as AdamW keeps it
            st["step"] = opt[f"{name}::step"]
        for full, v in state.get("optimizer_scalars", {}).items():
            pname, key = full.split("::", 1)
            if pname == name:
                st[key] = v
        if st:
            optimizer.state[p] = st
    for group, saved in zip(optimizer.param_groups, state.get("param_groups", [])):
        for k, v in saved.items():
            group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    return state
