"""Load rows, render them to examples, pack and collate.

Reading. Local `.jsonl`/`.json` files are parsed with the standard library, row by row: that keeps
each row exactly as written (Arrow would unify nested structs across rows, turning absent keys into
nulls and reordering tool schemas, which changes the rendered tokens) and lets errors name the line.
Parquet and CSV files, and hub ids, are loaded with `datasets`; there, columns holding structures
(messages, tools) may be JSON strings.

Parallelism. Rendering is pure Python over tiktoken (Rust); `num_proc=N` renders contiguous chunks
of rows in N worker processes and keeps input order. A large hub dataset can instead be rendered
with `datasets.map(num_proc=N)` calling `data.formats.to_conversation` and
`data.harmony.render_examples` per row; both are picklable module-level functions.
"""

from __future__ import annotations

import bisect
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data.errors import DataError
from data.formats import FORMATS, announce, detect_format, to_conversation
from data.harmony import LOSS_ON, REASONING_EFFORTS, render_examples
from data.tokenizer import PAD, get_tokenizer

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ON_ERROR = ("raise", "skip")
"""A bad row stops loading with an error naming it, or is left out and counted."""
TRUNCATION = ("drop", "truncate")
"""An example longer than max_seq_len is left out, or cut to length (counted either way)."""
IGNORE_INDEX = -100


@dataclass
class Example:
    """One training example. `loss_mask[i] == 1`: token i is a trained target."""

    input_ids: list[int]
    loss_mask: list[int]
    row: int = 0  # index of the source row (examples of one row share a prefix; split by row)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class LoadReport:
    """What `load_examples` did: the format chosen, and every row or example it left out, by reason."""

    source: str = ""
    format: str = ""
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)  # rows, per reason (on_error="skip")
    dropped: Counter = field(default_factory=Counter)  # examples, per reason (length, nothing trained)
    truncated: int = 0
    first_errors: dict[str, str] = field(default_factory=dict)  # reason -> first full message

    def __str__(self) -> str:
        line = (f"{self.source}: format {self.format}, {self.rows} rows -> {self.examples} examples "
                f"({self.tokens} tokens, {self.trained_tokens} trained)")
        if self.skipped:
            line += f"; skipped {sum(self.skipped.values())} rows: " + _counts(self.skipped)
        if self.dropped:
            line += f"; dropped {sum(self.dropped.values())} examples: " + _counts(self.dropped)
        if self.truncated:
            line += f"; truncated {self.truncated} examples"
        return line


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counter.most_common())


# --- reading rows ---

def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {', '.join(LOCAL_SUFFIXES)} files in this folder", "no data files")
        return files
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type (expected {', '.join(LOCAL_SUFFIXES)})", "bad file type")
    return [path]


def _read_json_file(path: Path) -> Iterable[tuple[str, object]]:
    """(location, row or DataError) for each row of a JSONL file, or of a JSON array file."""
    data = path.read_bytes()
    if path.suffix == ".json" and data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: invalid UTF-8 (byte {data[e.start]:#04x})", "invalid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}", "invalid JSON") from None
        yield from ((f"{path} item {i}", row) for i, row in enumerate(items))
        return
    # Lines are decoded one by one, so a bad byte is that line's error, not the file's.
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield f"{path}:{lineno}", DataError(f"invalid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})",
                                                "invalid UTF-8")
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", DataError(f"invalid JSON: {e.msg} (column {e.colno})", "invalid JSON")


def _numbered(rows, where: str) -> list[tuple[str, object]]:
    return [(f"{where} row {i}".lstrip(), row) for i, row in enumerate(rows)]


def read_rows(source, split: str = "train") -> tuple[str, list[tuple[str, object]]]:
    """(description, [(location, row or DataError), ...]) from a path, a hub id, a `datasets.Dataset`
    or a list of row dicts."""
    if isinstance(source, (str, os.PathLike)) and (os.path.exists(source) or Path(source).suffix in LOCAL_SUFFIXES):
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder", "no such file")
        if split != "train":
            raise DataError(f"{path}: local files have one split, 'train' (got {split!r})", "bad option")
        out: list[tuple[str, object]] = []
        for file in _local_files(path):
            if file.suffix in (".jsonl", ".json"):
                out += _read_json_file(file)
            else:
                import datasets

                ds = datasets.load_dataset(file.suffix[1:], data_files=[str(file)], split="train")
                out += _numbered(ds, str(file))
        return str(source), out
    if isinstance(source, str):
        import datasets

        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # the hub raises many types; the message is what the user needs
            raise DataError(f"{source}: not a local file or folder, and loading it from the hub failed: "
                            f"{type(e).__name__}: {e}. To work offline, download the dataset where there is a "
                            "network and pass its local .jsonl/.json/.parquet/.csv files or folder instead, "
                            "or set HF_DATASETS_OFFLINE=1 to read it from the local datasets cache",
                            "cannot load") from None
        return f"{source}[{split}]", _numbered(ds, f"{source}[{split}]")
    if isinstance(source, Sequence) or hasattr(source, "__iter__"):
        return "rows", _numbered(source, "")
    raise DataError(f"cannot read data from a {type(source).__name__}", "cannot load")


# --- rendering ---

def _render_row(row, fmt: str, split_turns: bool, loss_on: str, effort: str | None):
    """("ok", [(ids, mask), ...]) or ("error", reason, message)."""
    if isinstance(row, DataError):
        return "error", row.reason, str(row)
    try:
        return "ok", render_examples(to_conversation(row, fmt), split_turns=split_turns, loss_on=loss_on,
                                     reasoning_effort=effort)
    except DataError as e:
        return "error", e.reason, str(e)
    except (TypeError, AttributeError, KeyError, ValueError) as e:  # a shape no check anticipated
        return "error", "malformed row", f"malformed row ({type(e).__name__}: {e})"


def _render_chunk(args):
    rows, fmt, split_turns, loss_on, effort = args
    return [_render_row(row, fmt, split_turns, loss_on, effort) for row in rows]


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise DataError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}", "bad option")


def load_examples(
    source,
    format: str = "auto",
    *,
    split: str = "train",
    on_error: str = "raise",
    split_turns: bool = True,
    loss_on: str = "last_turn",
    reasoning_effort: str | None = None,
    max_seq_len: int | None = None,
    truncation: str = "drop",
    num_proc: int | None = None,
) -> tuple[list[Example], LoadReport]:
    """Rows -> examples, in input order, and a report of what was skipped, dropped or truncated.

    source: a local file or folder (.jsonl/.json/.parquet/.csv), a hub dataset id, a
    `datasets.Dataset`, or a list of row dicts. format: one of `data.formats.FORMATS` or "auto"
    (decided from the first row, and said on stderr). on_error: "raise" stops at the first bad row
    with a `DataError` naming it; "skip" leaves it out and counts it in the report. Examples longer
    than `max_seq_len` are dropped (`truncation="drop"`) or cut to length (`"truncate"`; cut
    examples left with nothing to train are dropped). Dropped examples are counted, never silent.
    """
    _check("format", format, ("auto", *FORMATS))
    _check("on_error", on_error, ON_ERROR)
    _check("loss_on", loss_on, LOSS_ON)
    _check("truncation", truncation, TRUNCATION)
    _check("reasoning_effort", reasoning_effort, (None, *REASONING_EFFORTS))
    get_tokenizer()  # a missing vocab is one error about the setup, not one per row
    where, rows = read_rows(source, split)
    report = LoadReport(source=where, rows=len(rows))
    if format == "auto":
        first = next((r for _, r in rows if isinstance(r, Mapping)), None)
        if first is None:
            raise DataError(f"{where}: no rows to read" if not rows else f"{rows[0][0]}: {rows[0][1]}", "no rows")
        loc = next(loc for loc, r in rows if r is first)
        format, why = detect_format(first)
        announce(format, why, loc)
    report.format = format

    chunks = [[r for _, r in rows[i:i + 512]] for i in range(0, len(rows), 512)]
    jobs = [(chunk, format, split_turns, loss_on, reasoning_effort) for chunk in chunks]
    if num_proc and num_proc > 1 and len(chunks) > 1:
        import gc
        import multiprocessing

        gc.freeze()  # workers' GC would otherwise touch, and so copy, every object inherited by fork
        try:
            with multiprocessing.get_context("fork").Pool(num_proc) as pool:
                results = [r for chunk in pool.imap(_render_chunk, jobs) for r in chunk]
        finally:
            gc.unfreeze()
    else:
        results = [r for job in jobs for r in _render_chunk(job)]

    examples = []
    for index, ((loc, _), result) in enumerate(zip(rows, results)):
        if result[0] == "error":
            _, reason, message = result
            if on_error == "raise":
                raise DataError(f"{loc}: {message}", reason)
            report.skipped[reason] += 1
            report.first_errors.setdefault(reason, f"{loc}: {message}")
            continue
        for ids, mask in result[1]:
            if max_seq_len is not None and len(ids) > max_seq_len:
                if truncation == "drop":
                    report.dropped[f"longer than max_seq_len={max_seq_len}"] += 1
                    continue
                ids, mask = ids[:max_seq_len], mask[:max_seq_len]
                if not any(mask):
                    report.dropped["nothing trained left after truncation"] += 1
                    continue
                report.truncated += 1
            if not any(mask):
                report.dropped[f"nothing to train (loss_on={loss_on})"] += 1
                continue
            examples.append(Example(ids, mask, index))
    report.examples = len(examples)
    report.tokens = sum(len(e) for e in examples)
    report.trained_tokens = sum(sum(e.loss_mask) for e in examples)
    return examples, report


def train_eval_split(examples: Sequence[Example], eval_size: float | int, *, seed: int = 0
                     ) -> tuple[list[Example], list[Example]]:
    """Hold out whole source rows (their examples share prefixes, so splitting examples would leak):
    a fraction of rows (`0 < eval_size < 1`) or a number of rows. Both parts keep input order."""
    rows = sorted({e.row for e in examples})
    n = round(eval_size * len(rows)) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
    if not 0 <= n <= len(rows):
        raise DataError(f"eval_size {eval_size} asks for {n} of {len(rows)} rows", "bad option")
    held = set(random.Random(seed).sample(rows, n))
    return [e for e in examples if e.row not in held], [e for e in examples if e.row in held]


def shuffle(items: Sequence, seed: int) -> list:
    """A seeded shuffle (of examples or packed rows), reproducible across runs and machines."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


# --- packing and batching ---

def pack_examples(examples: Sequence[Example], seq_len: int) -> list[list[Example]]:
    """Pack examples into rows of at most `seq_len` tokens, never splitting one (best fit, longest
    first). Rows come out grouped by length; shuffle rows, not examples, between epochs."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # sorted (tokens left, row index)
    for i in order:
        n = len(examples[i])
        if n > seq_len:
            raise DataError(f"an example of {n} tokens (row {examples[i].row}) does not fit seq_len={seq_len}; "
                            "set max_seq_len to drop or truncate long examples", "example too long")
        slot = bisect.bisect_left(free, (n, -1))
        if slot < len(free):
            left, r = free.pop(slot)
        else:
            left, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(examples[i])
        if left - n > 0:
            bisect.insort(free, (left - n, r))
    return rows


def collate(rows_or_examples: Sequence, pad_to: int | None = None) -> dict:
    """A batch of LongTensors [B, T] from examples or packed rows (lists of examples).

    input_ids: padded with <|endoftext|> (199999). labels: input_ids where the loss mask is 1, else
    -100, aligned with input_ids (the model shifts). position_ids: restart at 0 at each example's
    first token (the model keeps attention within examples); padding continues the last example's
    count, so it starts no example. num_tokens: a 0-dim LongTensor, the non-padding tokens.
    """
    import torch

    rows = [[x] if isinstance(x, Example) else list(x) for x in rows_or_examples]
    width = max((sum(len(e) for e in r) for r in rows), default=0)
    if pad_to is not None:
        if width > pad_to:
            raise DataError(f"a row of {width} tokens does not fit pad_to={pad_to}", "example too long")
        width = pad_to
    ids, labels, positions = [], [], []
    for r in rows:
        row_ids, row_labels, row_pos = [], [], []
        for e in r:
            row_ids += e.input_ids
            row_labels += [t if m else IGNORE_INDEX for t, m in zip(e.input_ids, e.loss_mask)]
            row_pos += range(len(e))
        pad = width - len(row_ids)
        start = len(r[-1]) if r else 0
        ids.append(row_ids + [PAD] * pad)
        labels.append(row_labels + [IGNORE_INDEX] * pad)
        positions.append(row_pos + list(range(start, start + pad)))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "num_tokens": torch.tensor(sum(sum(len(e) for e in r) for r in rows), dtype=torch.long),
    }
