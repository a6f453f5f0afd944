"""Reading and writing gpt-oss checkpoints: HF layout (sharded safetensors + index) and OpenAI's original/.

Everything is addressed by HF names (docs/ARCHITECTURE.md §4). Reads are lazy and tensor by tensor (safetensors
memory-maps), MXFP4 experts stay as their uint8 `_blocks`/`_scales` bytes until someone asks for
them dense. Writes stream tensor by tensor into shards and land atomically (temp dir + rename).
Weights come from safetensors only: pickle files are refused and never opened.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from . import mxfp4
from .config import GptOssConfig
from .experts import EXPERT_FORMATS

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 << 30
LAYOUTS = ("hf", "original")
"""HF's (HF names, sharded safetensors + index) and OpenAI's original/ (its names, MXFP4 experts only)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file or tensor."""


# -- the expected tensors ------------------------------------------------------------------------

def expected_shapes(config: GptOssConfig, *, experts: str = "mxfp4") -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of a checkpoint: the one list of the model's tensors (the
    GGUF writer and the merged export follow it). experts: "mxfp4" (`_blocks`/`_scales`) or
    "dequantized" (HF's bf16 `[E, in, out]`)."""
    c = config
    h, i, e, hd = c.hidden_size, c.intermediate_size, c.num_local_experts, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{name}.weight"] = (rows, h)
            if c.attention_bias:
                shapes[p + f"self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if c.attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "self_attn.sinks"] = (c.num_attention_heads,)
        shapes[p + "mlp.router.weight"] = (e, h)
        shapes[p + "mlp.router.bias"] = (e,)
        x = p + "mlp.experts."
        if experts == "mxfp4":
            shapes[x + "gate_up_proj_blocks"] = (e, 2 * i, h // 32, 16)
            shapes[x + "gate_up_proj_scales"] = (e, 2 * i, h // 32)
            shapes[x + "down_proj_blocks"] = (e, h, i // 32, 16)
            shapes[x + "down_proj_scales"] = (e, h, i // 32)
        elif experts == "dequantized":
            shapes[x + "gate_up_proj"] = (e, h, 2 * i)  # HF bf16 layout: [E, in, out]
            shapes[x + "down_proj"] = (e, i, h)
        else:
            raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
        shapes[x + "gate_up_proj_bias"] = (e, 2 * i)
        shapes[x + "down_proj_bias"] = (e, h)
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


# -- the original layout: one explicit table --------------------------------------------------------

# HF name (after "model.layers.N.") -> original name (after "block.N."); q/k/v are rows of attn.qkv.
_ORIGINAL_PER_LAYER = {
    "input_layernorm.weight": "attn.norm.scale",
    "self_attn.sinks": "attn.sinks",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
    "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
    "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
}
_ORIGINAL_GLOBAL = {
    "model.embed_tokens.weight": "embedding.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "unembedding.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_QKV_RE = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")


def _qkv_slices(config: GptOssConfig) -> dict[str, slice]:
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}


# -- reading -----------------------------------------------------------------------------------------

def _refuse_pickles(path: Path) -> None:
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing a pickle checkpoint; pickles can run code when loaded, so gptoss-ft "
            "reads weights from safetensors only (convert it with a tool you trust)"
        )
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path}: holds only pickle weights ({', '.join(pickles[:3])}); refusing to load them "
                "(pickles can run code). gptoss-ft reads weights from safetensors only."
            )


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; anything else is taken as a hub id and downloaded (safetensors only)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        _refuse_pickles(path)
        if path.is_file():
            raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
        return path
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such checkpoint directory (and not a hub id like 'openai/gpt-oss-20b')")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "original/*"])
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(
            f"could not download {text!r} from the hub ({type(e).__name__}: {e}). To work offline, "
            "download it elsewhere (e.g. `huggingface-cli download {text}`) and pass the local "
            "directory as model.path, or set HF_HUB_OFFLINE=1 to use the local cache only."
        ) from None
    return resolve(local)


class Checkpoint:
    """A gpt-oss checkpoint on disk, read lazily, addressed by HF names whatever its layout.

    layout "hf" reads the directory's HF files; "original" its OpenAI files (the directory itself
    or its `original/`); "auto" prefers HF files and falls back to `original/`.
    """

    def __init__(self, path: str | os.PathLike, *, layout: str = "auto"):
        root = resolve(path)
        if layout not in ("auto", *LAYOUTS):
            raise ValueError(f"layout must be auto, hf or original, got {layout!r}")
        hf_files = sorted(root.glob("*.safetensors"))
        is_original_dir = (root / "config.json").exists() and _is_original_config(root / "config.json")
        if layout == "auto":
            layout = "original" if is_original_dir or (not hf_files and (root / "original").is_dir()) else "hf"
        if layout == "original" and not is_original_dir:
            if not (root / "original").is_dir():
                raise CheckpointError(f"{root}: no original/ directory and not an original-layout checkpoint")
            root = root / "original"
            _refuse_pickles(root)
        self.path = root
        self.layout = layout
        self.config = GptOssConfig.from_json(root / "config.json")
        self._files = {}
        self._where = self._index_files(root)  # stored name -> file
        self._names = self._map_names()  # HF name -> (stored name, row slice or None)

    # The stored names, from the index when there is one, else from each file's header.
    def _index_files(self, root: Path) -> dict[str, Path]:
        index = root / INDEX_NAME
        if self.layout == "hf" and index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            where = {name: root / fname for name, fname in weight_map.items()}
            for f in set(where.values()):
                if not f.exists():
                    raise CheckpointError(f"{index} names {f.name}, which is missing")
            return where
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{root}: no .safetensors files")
        where = {}
        for f in files:
            for name in self._open(f).keys():
                where[name] = f
        return where

    def _open(self, f: Path):
        if f not in self._files:
            try:
                self._files[f] = safe_open(str(f), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        return self._files[f]

    def _map_names(self) -> dict[str, tuple[str, slice | None]]:
        if self.layout == "hf":
            return {name: (name, None) for name in self._where}
        inverse_layer = {v: k for k, v in _ORIGINAL_PER_LAYER.items()}
        inverse_global = {v: k for k, v in _ORIGINAL_GLOBAL.items()}
        qkv = _qkv_slices(self.config)
        names: dict[str, tuple[str, slice | None]] = {}
        for stored in self._where:
            if stored in inverse_global:
                names[inverse_global[stored]] = (stored, None)
                continue
            m = re.match(r"^block\.(\d+)\.(.+)$", stored)
            if m and m.group(2) in inverse_layer:
                names[f"model.layers.{m.group(1)}.{inverse_layer[m.group(2)]}"] = (stored, None)
            elif m and m.group(2) in ("attn.qkv.weight", "attn.qkv.bias"):
                kind = m.group(2).rsplit(".", 1)[1]
                for proj, rows in qkv.items():
                    names[f"model.layers.{m.group(1)}.self_attn.{proj}_proj.{kind}"] = (stored, rows)
            else:
                raise CheckpointError(f"{self._where[stored]}: unknown original-layout tensor {stored!r}")
        return names

    # -- access -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    @property
    def experts_format(self) -> str:
        """"mxfp4" when experts are stored as `_blocks`/`_scales`, else "dequantized"."""
        return "mxfp4" if "model.layers.0.mlp.experts.gate_up_proj_blocks" in self._names else "dequantized"

    def shape(self, name: str) -> tuple[int, ...]:
        stored, rows = self._lookup(name)
        shape = tuple(self._open(self._where[stored]).get_slice(stored).get_shape())
        if rows is not None:
            shape = (rows.stop - rows.start, *shape[1:])
        return shape

    def _lookup(self, name: str) -> tuple[str, slice | None]:
        try:
            return self._names[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing") from None

    def get(self, name: str, dtype: torch.dtype | None = None, *, own: bool = False) -> torch.Tensor:
        """One tensor by HF name, as stored (uint8 MXFP4 bytes stay bytes); floats cast to `dtype`.

        Tensors kept as stored are views of safetensors' mapping of the whole file, which stays
        resident (every page touched) while any view lives: fine for streaming, not for a model's
        weights. `own=True` returns a tensor that owns its memory (a copy only when needed)."""
        stored, rows = self._lookup(name)
        handle = self._open(self._where[stored])
        t = handle.get_slice(stored)[rows] if rows is not None else handle.get_tensor(stored)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)  # a new tensor
        return t.clone() if own else t

    def get_expert_weight(self, layer: int, proj: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """`mlp.experts.{proj}` in HF's dense layout (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`),
        decoding MXFP4 when that is how it is stored."""
        base = f"model.layers.{layer}.mlp.experts.{proj}"
        if base in self._names:
            return self.get(base, dtype)
        w = mxfp4.dequantize(self.get(base + "_blocks"), self.get(base + "_scales"), dtype)  # [E, out, in]
        return w.transpose(1, 2).contiguous()

    def validate(self) -> None:
        """Every expected tensor present with its expected shape; errors name the tensor."""
        want = expected_shapes(self.config, experts=self.experts_format)
        missing = [n for n in want if n not in self._names]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.path}: missing tensors {', '.join(missing[:5])}{more}")
        for name, shape in want.items():
            got = self.shape(name)
            if got != shape:
                raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(got)}, config says {list(shape)}")
        extra = sorted(set(self._names) - set(want))
        if extra:
            raise CheckpointError(f"{self.path}: unexpected tensors {', '.join(extra[:5])}")

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._names:
            yield name, self.get(name)


def _is_original_config(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "num_experts" in d and "experts_per_token" in d and "num_local_experts" not in d


# -- writing -----------------------------------------------------------------------------------------

@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Write a directory all at once: yields a temporary directory beside `final`; when the block
    ends, its files are fsynced and it replaces `final` by rename (an existing `final` is swapped
    out, never half-written); when the block raises, the temporary directory is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        _atomic_replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Write one file all at once: yields a temporary path beside `final`, which replaces `final`
    by rename (after an fsync) when the block ends, and is removed when it raises."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp directory to `final`; an existing `final` is replaced, never half-written."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _fsync_dir(path: Path) -> None:
    """Files (and the directory entry list) on disk before the rename makes them visible."""
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


class _ShardFile:
    """One safetensors file written as tensors arrive: each tensor's bytes go to disk when added, so
    a writer holds no tensor after `add` returns (safetensors' `save_file` needs every tensor of the
    shard in memory, plus a serialised copy). The header, which precedes the data in the format,
    is known only at the end: `finish` writes it and then moves the data behind it with the
    kernel's file-to-file copy."""

    def __init__(self, path: Path):
        self.path = path
        self.data = open(path.with_suffix(".data"), "wb")
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors type")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            self.data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.size, self.size + nbytes]}
        self.size += nbytes

    def finish(self) -> list[str]:
        """Write the file (header, then the data) and return its tensor names."""
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        data_path = Path(self.data.name)
        with open(self.path, "wb") as out, open(data_path, "rb") as src:
            out.write(struct.pack("<Q", len(header)) + header)
            out.flush()
            _copy_file(src, out, self.size)
        data_path.unlink()
        return list(self.entries)


def _copy_file(src, out, size: int) -> None:
    """Append `size` bytes of `src` to `out`: in the kernel where it can (Linux), else in 64 MiB pieces."""
    left = size
    if hasattr(os, "copy_file_range"):
        try:
            while left:
                left -= os.copy_file_range(src.fileno(), out.fileno(), min(left, 1 << 30))
            return
        except OSError:  # a file system or kernel without it: the positions are where it stopped
            pass
    while left:
        piece = src.read(min(left, 64 << 20))
        out.write(piece)
        left -= len(piece)


class CheckpointWriter:
    """Streams tensors (by HF name) into a checkpoint directory that appears only when complete.

    Shards hold at most `max_shard_bytes` (one file, `model.safetensors`, when everything fits).
    layout "hf": HF names, with `model.safetensors.index.json` when sharded. layout "original":
    OpenAI's names, q/k/v rows joined into `attn.qkv` (needs MXFP4 experts).
    Use as a context manager; an exception discards the partial output.
    """

    def __init__(self, out_dir: str | os.PathLike, config: GptOssConfig, *, layout: str = "hf",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be hf or original, got {layout!r}")
        self.final = Path(out_dir)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir()
        self.config = config
        self.layout = layout
        self.max_shard_bytes = max_shard_bytes
        self._pending: _ShardFile | None = None
        self._total_bytes = 0
        self._shards: list[list[str]] = []
        self._qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self._mxfp4 = False
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name.endswith("_blocks"):
            self._mxfp4 = True
        if self.layout == "original":
            name, tensor = self._to_original(name, tensor)
            if name is None:
                return
        tensor = tensor.detach().to("cpu").contiguous()
        if (self._pending is not None and name in self._pending.entries) or any(name in s for s in self._shards):
            raise CheckpointError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending is not None and self._pending.entries and self._pending.size + size > self.max_shard_bytes:
            self._flush()
        if self._pending is None:
            self._pending = _ShardFile(self.tmp / f"shard-{len(self._shards)}.safetensors")
        self._pending.add(name, tensor)
        self._total_bytes += size

    def _to_original(self, name: str, tensor: torch.Tensor):
        if name in _ORIGINAL_GLOBAL:
            return _ORIGINAL_GLOBAL[name], tensor
        m = _LAYER_RE.match(name)
        if not m:
            raise CheckpointError(f"no original-layout name for {name!r}")
        layer, rest = int(m.group(1)), m.group(2)
        if rest in _ORIGINAL_PER_LAYER:
            return f"block.{layer}.{_ORIGINAL_PER_LAYER[rest]}", tensor
        q = _QKV_RE.match(rest)
        if not q:
            raise CheckpointError(f"no original-layout name for {name!r} (original/ stores experts in MXFP4 only)")
        parts = self._qkv.setdefault((layer, q.group(2)), {})
        parts[q.group(1)] = tensor
        if len(parts) < 3:
            return None, None
        del self._qkv[(layer, q.group(2))]
        return f"block.{layer}.attn.qkv.{q.group(2)}", torch.cat([parts["q"], parts["k"], parts["v"]], 0)

    def _flush(self) -> None:
        if self._pending is None:
            return
        self._shards.append(self._pending.finish())
        self._pending = None

    def close(self) -> Path:
        if self._qkv:
            raise CheckpointError(f"incomplete q/k/v for original layout: {sorted(self._qkv)}")
        self._flush()
        total = len(self._shards)
        weight_map = {}
        for n, names in enumerate(self._shards):
            fname = "model.safetensors" if total == 1 else f"model-{n + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.tmp / f"shard-{n}.safetensors", self.tmp / fname)
            for name in names:
                weight_map[name] = fname
        if self.layout == "original":  # OpenAI's reader, like ours, takes every .safetensors file in original/
            (self.tmp / "config.json").write_text(json.dumps(self.config.to_original_dict(), indent=2) + "\n")
        else:
            if total > 1:
                index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
                (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            cfg = self.config.to_hf_dict(mxfp4=self._mxfp4)
            (self.tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        _fsync_dir(self.tmp)
        _atomic_replace_dir(self.tmp, self.final)
        self._closed = True
        return self.final

    def abort(self) -> None:
        if self._pending is not None:
            self._pending.data.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def save(out_dir: str | os.PathLike, config: GptOssConfig, tensors: Iterable[tuple[str, torch.Tensor]],
         *, layout: str = "hf", max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write (HF name, tensor) pairs as a checkpoint directory, atomically."""
    with CheckpointWriter(out_dir, config, layout=layout, max_shard_bytes=max_shard_bytes) as w:
        for name, t in tensors:
            w.add(name, t)
        return w.close()


# -- random checkpoints (tests, quickstart, benchmarks) ----------------------------------------------

DRAW_CODES_ABOVE = 1 << 26
"""Expert tensors with more values than this get MXFP4 codes drawn directly (`_drawn_mxfp4`) instead
of quantizing a Gaussian: the full-size presets (gpt-oss-20b: 530M values a tensor), where the
exponent search would take minutes and gigabytes per tensor and no fidelity is needed."""


def _drawn_mxfp4(shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 (blocks, scales) distributed like N(0, std) rounded to MXFP4: one scale for every block,
    2^ceil(log2(2.5 std / 6)) (values saturate only beyond 2.5 std), and each 4-bit code drawn with
    the probability that N(0, std) rounds to its value at that scale (the dequantized std is std).
    Drawn one expert at a time: memory stays at one expert's codes plus 4 bytes a byte of uniforms."""
    e, out, g, half = shape
    exp = math.ceil(math.log2(2.5 * std / 6.0))
    sigma = std / 2.0 ** exp  # the values' std in units of the scale
    mags = torch.tensor(mxfp4.FP4_VALUES[:8], dtype=torch.float64)
    edges = torch.cat([torch.tensor([0.0]), (mags[1:] + mags[:-1]) / 2, torch.tensor([math.inf])])
    cdf = 0.5 * (1 + torch.erf(edges / (sigma * math.sqrt(2))))
    p_mag = 2 * (cdf[1:] - cdf[:-1])  # |x| rounds to each magnitude
    p_code = torch.cat([p_mag, p_mag]) / 2  # codes 0-7 positive, 8-15 negative, equally likely
    p_byte = (p_code[:, None] * p_code[None, :]).flatten()  # byte = high nibble * 16 + low nibble
    cdf_byte = torch.cumsum(p_byte, 0).to(torch.float32)
    cdf_byte[-1] = 1.0
    blocks = torch.empty(shape, dtype=torch.uint8)
    for i in range(e):
        u = torch.rand(out * g * half, generator=gen)
        blocks[i] = torch.searchsorted(cdf_byte, u, right=True).clamp_(max=255).to(torch.uint8).view(out, g, half)
    return blocks, torch.full((e, out, g), exp + mxfp4.SCALE_BIAS, dtype=torch.uint8)


def random_tensors(config: GptOssConfig, *, seed: int = 0, experts: str = "mxfp4",
                   dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights for every tensor, generated one at a time (so large configs stream).

    Every parameter is random, sinks, biases and norms included, so tests see each of them matter.
    Matrices and biases have std 0.02 like a fresh init; norms are near 1; experts are quantized to
    MXFP4 (drawn as codes directly above DRAW_CODES_ABOVE values). `lm_head` rows have std
    4 / sqrt(H): the final norm gives h of norm ~sqrt(H), so logits spread with std ~4 as a trained
    model's do, and a LoRA-only fine-tune of a tiny random model can make one token win (with std
    0.02 at H = 64, every logit stays within ~1 of the others).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, shape in expected_shapes(config, experts=experts).items():
        if name.endswith("_scales"):
            continue  # produced with its blocks
        if name.endswith("_blocks"):
            proj = name[: -len("_blocks")]
            e, out, g, _ = shape
            if e * out * g * 32 > DRAW_CODES_ABOVE:
                blocks, scales = _drawn_mxfp4(shape, gen)
            else:
                blocks, scales = mxfp4.quantize(torch.randn(e, out, g * 32, generator=gen) * 0.02)
            yield name, blocks
            yield proj + "_scales", scales
            continue
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("sinks"):
            t = torch.randn(shape, generator=gen)
        elif name == "lm_head.weight":
            t = 4.0 / config.hidden_size ** 0.5 * torch.randn(shape, generator=gen)
        else:
            t = 0.02 * torch.randn(shape, generator=gen)
        yield name, t.to(dtype)


def write_random(out_dir: str | os.PathLike, config: GptOssConfig, *, seed: int = 0, layout: str = "hf",
                 experts: str = "mxfp4", max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A random gpt-oss checkpoint (`gptoss-ft init`)."""
    if layout == "original" and experts != "mxfp4":
        raise ValueError("the original layout stores experts in MXFP4 only")
    cfg = config.replace(quantization_config=None) if experts == "dequantized" else config
    return save(out_dir, cfg, random_tensors(cfg, seed=seed, experts=experts), layout=layout,
                max_shard_bytes=max_shard_bytes)
