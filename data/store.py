"""Rendered examples in compact arrays, on disk and in memory, and the cache that keeps them.

A set of n examples of T tokens in all is four 1-D arrays, each a `.npy` file read memory-mapped:

    input_ids  int32 [T]    every example's tokens, one example after another
    loss_mask  uint8 [T]    1 where the token is a trained target
    offsets    int64 [n+1]  example i is tokens offsets[i]:offsets[i+1]
    rows       int64 [n]    the source row of each example

That is 5 bytes a token (plus 16 an example), where Python lists of ints cost about 50 (an 8-byte
pointer per element and a 28-byte int object for ids above 256). `Examples` is the sequence of
`Example`s over these arrays: an item is built when it is read (a batch at a time), and the arrays'
pages are shared by every process that maps the same files. `PackedRows` is the same idea for packed
rows: two index arrays over an `Examples`.

The cache. A rendered set lives in `CACHE_DIR/<key>/` (the four arrays and `meta.json` with the
load report and the key's material); the key is a hash of the data's identity (each file's path,
size and mtime, or a hub dataset's fingerprint) and of every option that changes the tokens, and of
the source of the `data` package (the renderer's code version). An entry is built in a temporary
directory next to it and renamed into place, so it is complete or absent, never half-written; an
exclusive lock (`<key>.lock`, flock) makes one process render while the others (the other processes
of a multi-process run, or another run on the same data) wait and then read what it wrote.
Nothing is pickled: arrays are `.npy` (read with `allow_pickle=False`) and the rest JSON.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.errors import DataError

CACHE_VERSION = 1
"""The layout of a cache entry; part of every key."""
ARRAYS = {"input_ids": np.int32, "loss_mask": np.uint8, "offsets": np.int64, "rows": np.int64}


def default_cache_dir() -> Path:
    """$GPTOSS_FT_CACHE/data, else $XDG_CACHE_HOME/gptoss-ft/data, else ~/.cache/gptoss-ft/data."""
    if os.environ.get("GPTOSS_FT_CACHE"):
        return Path(os.environ["GPTOSS_FT_CACHE"]).expanduser() / "data"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gptoss-ft" / "data"


@functools.cache
def code_version() -> str:
    """A hash of the `data` package's source: a change to the renderer, the formats, the mappings or
    the pipeline makes every cached render stale (cheaper to re-render than to reason about which)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Example:
    """One training example. `loss_mask[i] == 1`: token i is a trained target."""

    input_ids: list[int]
    loss_mask: list[int]
    row: int = 0  # index of the source row (examples of one row share a prefix; split by row)

    def __len__(self) -> int:
        return len(self.input_ids)


class _View(Sequence):
    """A sequence of the items `_item(k)` for k in `index` (all items when index is None): slices and
    selections are views sharing the same arrays."""

    def __init__(self, size: int, index: np.ndarray | None):
        self._size, self._index = size, index

    def _item(self, k: int):
        raise NotImplementedError

    def _with(self, index: np.ndarray):
        raise NotImplementedError

    def _global(self) -> np.ndarray:
        return np.arange(self._size) if self._index is None else self._index

    def __len__(self) -> int:
        return self._size if self._index is None else len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._with(self._global()[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        i %= n
        return self._item(i if self._index is None else int(self._index[i]))

    def select(self, positions) -> _View:
        """The items at these positions (an array of indices into this sequence), as a view."""
        return self._with(self._global()[np.asarray(positions, dtype=np.int64)])

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None


class Examples(_View):
    """Examples over flat arrays (module docstring): `examples[i]` is an `Example` built on access."""

    def __init__(self, arrays: dict[str, np.ndarray], index: np.ndarray | None = None):
        super().__init__(len(arrays["rows"]), index)
        self.arrays = arrays

    @classmethod
    def from_dir(cls, path: Path) -> Examples:
        """The arrays written in `path`, memory-mapped (read-only)."""
        arrays = {}
        for name, dtype in ARRAYS.items():
            a = np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if a.dtype != dtype or a.ndim != 1:
                raise DataError(f"{path / name}.npy: expected a 1-D {np.dtype(dtype)} array, found {a.dtype} "
                                f"{a.shape}; delete {path} to render again", "bad cache")
            arrays[name] = a
        o = arrays["offsets"]
        if len(o) != len(arrays["rows"]) + 1 or o[-1] != len(arrays["input_ids"]) or len(arrays["loss_mask"]) != o[-1]:
            raise DataError(f"{path}: the cached arrays disagree in length; delete it to render again", "bad cache")
        return cls(arrays)

    def _item(self, k: int) -> Example:
        a, b = int(self.arrays["offsets"][k]), int(self.arrays["offsets"][k + 1])
        return Example(self.arrays["input_ids"][a:b].tolist(), self.arrays["loss_mask"][a:b].tolist(),
                       int(self.arrays["rows"][k]))

    def _with(self, index: np.ndarray) -> Examples:
        return Examples(self.arrays, index)

    def lengths(self) -> np.ndarray:
        """Tokens of each example (int64), without building any."""
        n = np.diff(self.arrays["offsets"])
        return n if self._index is None else n[self._index]

    def row_ids(self) -> np.ndarray:
        """The source row of each example (int64)."""
        rows = np.asarray(self.arrays["rows"])
        return rows if self._index is None else rows[self._index]

    @property
    def num_rows(self) -> int:
        """How many source rows the examples come from."""
        return len(np.unique(self.row_ids()))

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples, {int(self.lengths().sum())} tokens)"


class PackedRows(_View):
    """Packed rows over a sequence of examples: row r is the list of `examples[m]` for m in
    `members[starts[r]:starts[r+1]]`, built on access."""

    def __init__(self, examples: Sequence[Example], members: np.ndarray, starts: np.ndarray,
                 index: np.ndarray | None = None):
        super().__init__(len(starts) - 1, index)
        self.examples, self.members, self.starts = examples, members, starts

    def _item(self, k: int) -> list[Example]:
        return [self.examples[int(m)] for m in self.members[self.starts[k]:self.starts[k + 1]]]

    def _with(self, index: np.ndarray) -> PackedRows:
        return PackedRows(self.examples, self.members, self.starts, index)

    def __repr__(self) -> str:
        return f"PackedRows({len(self)} rows of {len(self.members)} examples)"


# --- writing ---

class ArrayWriter:
    """A 1-D `.npy` file written piece by piece: the header is written first with length 0 and
    rewritten with the final length at `close` (the header is padded to a fixed 128 bytes for any
    length below 10^19, so it never moves the data)."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self._file = open(path, "wb")
        self._header()

    def _header(self) -> None:
        np.lib.format.write_array_header_1_0(
            self._file, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.n,)})
        if self._file.tell() != 128:
            raise AssertionError(f"{self.path}: unexpected .npy header size {self._file.tell()}")

    def append(self, values: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.n += len(values)

    def close(self) -> None:
        self._file.flush()
        self._file.seek(0)
        self._header()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class ExampleWriter:
    """Streams rendered examples into the four arrays of a directory."""

    def __init__(self, path: Path):
        self.path = path
        self.files = {name: ArrayWriter(path / f"{name}.npy", dtype) for name, dtype in ARRAYS.items()}
        self.files["offsets"].append(np.zeros(1, np.int64))
        self.tokens = 0

    def append(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> None:
        self.files["input_ids"].append(ids)
        self.files["loss_mask"].append(mask)
        self.files["offsets"].append(self.tokens + np.cumsum(lengths, dtype=np.int64))
        self.files["rows"].append(rows)
        self.tokens += len(ids)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


# --- the cache ---

def cache_key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cached(cache_dir: Path, material: dict, build: Callable[[Path], dict]) -> tuple[Path, dict, bool]:
    """(entry directory, its meta, whether this call built it) for the key of `material`.

    When the entry is absent, `build(tmp)` writes the arrays into a fresh directory and returns the
    meta (JSON data); the directory is renamed into place. One process builds at a time: the others
    block on the entry's lock, then find it built. A failing build leaves nothing behind, and the next
    process to take the lock tries again (and fails the same way on the same data)."""
    key = cache_key({"cache_version": CACHE_VERSION, **material})
    entry = cache_dir / key
    if (entry / "meta.json").exists():
        return entry, _read_meta(entry), False
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / f"{key}.lock", "a")
    except OSError as e:
        raise DataError(f"cannot write the rendered-data cache in {cache_dir} ({e.strerror}); point data.cache_dir "
                        "at a writable folder, or set data.cache: false", "cache not writable") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"data: another process is rendering this data into {entry}; waiting for it", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / "meta.json").exists():  # built while this process waited
            return entry, _read_meta(entry), False
        for stale in cache_dir.glob(f"{key}.tmp-*"):  # left by a process that died while building
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f"{key}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            meta = {**build(tmp), "key": material}
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, entry)
            _fsync_dir(cache_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry, meta, True


def _read_meta(entry: Path) -> dict:
    try:
        return json.loads((entry / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{entry}/meta.json: unreadable ({e}); delete {entry} to render again", "bad cache") from None


def build_private(build: Callable[[Path], dict]) -> tuple[Examples, dict]:
    """Arrays built in a temporary directory that is removed once they are mapped (the mappings keep
    the data until the arrays are freed): the same path as the cache, for data that is not cached."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="gptoss-ft-render-"))
    try:
        meta = build(tmp)
        return Examples.from_dir(tmp), meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
