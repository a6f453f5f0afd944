"""Load rows, render them to examples (SFT), preference pairs (DPO) or prompts (GRPO), pack and collate.

Reading. Local `.jsonl`/`.json` files are parsed with the standard library, row by row: that keeps
each row exactly as written (Arrow would unify nested structs across rows, turning absent keys into
nulls and reordering tool schemas, which changes the rendered tokens) and lets errors name the line.
Parquet and CSV files, and hub ids, are loaded with `datasets` and read from the Arrow table a batch
at a time; there, columns holding structures (messages, tools) may be JSON strings.

Scale (SFT). `load_examples` streams rows in chunks of `CHUNK_ROWS` to `num_proc` forked workers
(rendering is pure Python over tiktoken; by default every core), a few chunks ahead of the results,
and writes the examples into flat arrays (`data.store`: ~5 bytes a token) as they come back, so
neither the rows nor Python lists of token ids are ever held whole. With `cache_dir`, the arrays are
kept and reused by the next load of the same data with the same options. `pack_examples` packs from
the examples' lengths alone, and packed rows are index arrays; a batch builds its `Example`s when
it is collated. Preference pairs and prompts (DPO, GRPO) are Python objects, rendered the same way
in parallel but held in lists.
"""

from __future__ import annotations

import heapq
import json
import os
import random
from bisect import bisect_left, insort
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.formats import (
    FORMATS,
    PAIR_FORMATS,
    PROMPT_FORMATS,
    announce,
    detect_format,
    generic_row,
    preference_conversations,
    prompt_conversation,
    to_conversation,
)
from data.harmony import LOSS_ON, REASONING_EFFORTS, Message, render_examples, render_for_completion
from data.store import Example, Examples, ExampleWriter, PackedRows, build_private, cached, code_version
from data.tokenizer import PAD, get_tokenizer

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ON_ERROR = ("raise", "skip")
"""A bad row stops loading with an error naming it, or is left out and counted."""
TRUNCATION = ("drop", "truncate")
"""An example longer than max_seq_len is left out, or cut to length (counted either way)."""
IGNORE_INDEX = -100


@dataclass
class PreferencePair:
    """One DPO pair: prompt + chosen and prompt + rejected, each ending at its completion's end.
    Both start with the same prompt tokens; only completion tokens have loss_mask 1."""

    chosen: Example
    rejected: Example
    row: int  # index of the source row


@dataclass
class PromptRow:
    """One GRPO prompt: what the model reads before it answers, and the row's other columns."""

    prompt: list[int]  # token ids ending with <|start|>assistant
    columns: dict  # the row's other fields (for reward functions)
    row: int  # index of the source row
    given: object = None  # the row's `prompt` as written (text or messages): what reward functions see


@dataclass
class LoadReport:
    """What `load_examples` (`load_pairs`, `load_prompts`) did: the format chosen, and every row or
    example (pair, prompt) it left out, by reason."""

    source: str = ""
    format: str = ""
    rows: int = 0
    examples: int = 0  # examples, pairs or prompts kept (`unit`)
    tokens: int = 0
    trained_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)  # rows, per reason (on_error="skip")
    dropped: Counter = field(default_factory=Counter)  # examples, per reason (length, nothing trained)
    truncated: int = 0
    first_errors: dict[str, str] = field(default_factory=dict)  # reason -> first full message
    unit: str = "examples"  # what `examples` counts: examples, pairs or prompts
    cache: str = ""  # "rendered into DIR" or "read from DIR" when the load used a cache

    def __str__(self) -> str:
        line = f"{self.source}: format {self.format}, {self.rows} rows -> {self.examples} {self.unit} "
        line += (f"({self.tokens} tokens)" if self.unit == "prompts" else
                 f"({self.tokens} tokens, {self.trained_tokens} trained)")
        if self.skipped:
            line += f"; skipped {sum(self.skipped.values())} rows: " + _counts(self.skipped)
        if self.dropped:
            line += f"; dropped {sum(self.dropped.values())} {self.unit}: " + _counts(self.dropped)
        if self.truncated:
            line += f"; truncated {self.truncated} {self.unit}"
        if self.cache:
            line += f"; cache: {self.cache}"
        return line


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counter.most_common())


# --- reading rows ---

class JsonLine(bytes):
    """A JSONL line not parsed yet (parsed where it is rendered, in a worker when there are several)."""


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {', '.join(LOCAL_SUFFIXES)} files in this folder", "no data files")
        return files
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type (expected {', '.join(LOCAL_SUFFIXES)})", "bad file type")
    return [path]


def _parse_line(raw: bytes):
    """A JSONL line's row, or the DataError saying why it is not one. A bad byte is that line's
    error, not the file's."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(f"invalid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})", "invalid UTF-8")
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return DataError(f"invalid JSON: {e.msg} (column {e.colno})", "invalid JSON")


def _parsed(payload):
    return _parse_line(payload) if isinstance(payload, JsonLine) else payload


def _read_json_file(path: Path) -> Iterator[tuple[str, object]]:
    """(location, JsonLine) for each line of a JSONL file, read as a stream; (location, row) for each
    item of a JSON array file (parsed whole: use JSONL for large data)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if path.suffix == ".json" and head[:1] == b"[":
            data = f.read()
            try:
                items = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                line = data[: e.start].count(b"\n") + 1
                raise DataError(f"{path}:{line}: invalid UTF-8 (byte {data[e.start]:#04x})", "invalid UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}", "invalid JSON") from None
            del data
            yield from ((f"{path} item {i}", row) for i, row in enumerate(items))
            return
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield f"{path}:{lineno}", JsonLine(raw[:-1] if raw.endswith(b"\n") else raw)


def _dataset_rows(ds, where: str) -> Iterator[tuple[str, dict]]:
    """The rows of a `datasets` table, converted to Python one batch at a time (the table stays in
    Arrow, memory-mapped)."""
    i = 0
    for batch in ds.iter(batch_size=CHUNK_ROWS):
        columns = list(batch)
        for j in range(len(batch[columns[0]]) if columns else 0):
            yield f"{where} row {i}".lstrip(), {c: batch[c][j] for c in columns}
            i += 1


def _file_rows(files: list[Path]) -> Iterator[tuple[str, object]]:
    for file in files:
        if file.suffix in (".jsonl", ".json"):
            yield from _read_json_file(file)
        else:
            import datasets

            yield from _dataset_rows(datasets.load_dataset(file.suffix[1:], data_files=[str(file)], split="train"),
                                     str(file))


@dataclass
class Source:
    """Rows to read: `items` yields (location, row, JsonLine or DataError) lazily; `identity` is what
    the cache key says about the data (None: not cacheable, e.g. rows given in memory)."""

    where: str
    items: Iterator[tuple[str, object]]
    identity: dict | None


def open_source(source, split: str = "train", subset: str | None = None) -> Source:
    """The rows of a path, a hub id (`subset`: the dataset's configuration, e.g. gsm8k's "main"), a
    `datasets.Dataset` or a list of row dicts, as a stream."""
    if isinstance(source, (str, os.PathLike)) and (os.path.exists(source) or Path(source).suffix in LOCAL_SUFFIXES):
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder", "no such file")
        if split != "train":
            raise DataError(f"{path}: local files have one split, 'train' (got {split!r})", "bad option")
        if subset is not None:
            raise DataError(f"{path}: local files have no subsets (got {subset!r}); subsets are for hub ids",
                            "bad option")
        files = _local_files(path)
        stats = [(f, f.stat()) for f in files]
        identity = {"files": [[os.path.realpath(f), st.st_size, st.st_mtime_ns] for f, st in stats]}
        return Source(str(source), _file_rows(files), identity)
    if isinstance(source, str):
        import datasets

        try:
            ds = datasets.load_dataset(source, subset, split=split)
        except Exception as e:  # the hub raises many types; the message is what the user needs
            raise DataError(f"{source}: not a local file or folder, and loading it from the hub failed: "
                            f"{type(e).__name__}: {e}. To work offline, download the dataset where there is a "
                            "network and pass its local .jsonl/.json/.parquet/.csv files or folder instead, "
                            "or set HF_DATASETS_OFFLINE=1 to read it from the local datasets cache",
                            "cannot load") from None
        name = f"{source}[{subset}/{split}]" if subset else f"{source}[{split}]"
        # datasets' fingerprint changes with the dataset's revision and any transform applied to it
        return Source(name, _dataset_rows(ds, name),
                      {"hub": source, "subset": subset, "split": split, "fingerprint": ds._fingerprint})
    if hasattr(source, "iter") and hasattr(source, "column_names"):  # a datasets.Dataset
        fingerprint = getattr(source, "_fingerprint", None)
        return Source("rows", _dataset_rows(source, ""), {"dataset": fingerprint} if fingerprint else None)
    if isinstance(source, Sequence) or hasattr(source, "__iter__"):
        return Source("rows", ((f"row {i}", row) for i, row in enumerate(source)), None)
    raise DataError(f"cannot read data from a {type(source).__name__}", "cannot load")


def read_rows(source, split: str = "train", subset: str | None = None) -> tuple[str, list[tuple[str, object]]]:
    """(description, [(location, row or DataError), ...]): `open_source`'s rows, all parsed, in a list."""
    src = open_source(source, split, subset)
    return src.where, [(loc, _parsed(p)) for loc, p in src.items]


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


@dataclass
class _Rendered:
    """A chunk of rows rendered: its kept examples in flat arrays, and what was left out."""

    rows: int
    ids: np.ndarray  # int32, the kept examples' tokens one after another
    mask: np.ndarray  # uint8
    lengths: np.ndarray  # int64, one per kept example
    row_of: np.ndarray  # int64, each kept example's row, counted from the chunk's first
    errors: list[tuple[int, str, str, str]]  # (row in chunk, location, reason, message)
    dropped: Counter
    truncated: int


def _render_examples_chunk(args) -> _Rendered:
    """One chunk of rows -> examples, with the length limits applied (module-level: run by workers)."""
    items, (fmt, split_turns, loss_on, effort, max_seq_len, truncation, on_error) = args
    ids_parts, mask_parts, lengths, row_of, errors = [], [], [], [], []
    dropped, truncated = Counter(), 0
    for k, (loc, payload) in enumerate(items):
        result = _render_row(_parsed(payload), fmt, split_turns, loss_on, effort)
        if result[0] == "error":
            errors.append((k, loc, result[1], result[2]))
            if on_error == "raise":
                break  # the load stops at this row
            continue
        for ids, mask in result[1]:
            if max_seq_len is not None and len(ids) > max_seq_len:
                if truncation == "drop":
                    dropped[f"longer than max_seq_len={max_seq_len}"] += 1
                    continue
                ids, mask = ids[:max_seq_len], mask[:max_seq_len]
                if not any(mask):
                    dropped["nothing trained left after truncation"] += 1
                    continue
                truncated += 1
            if not any(mask):
                dropped[f"nothing to train (loss_on={loss_on})"] += 1
                continue
            ids_parts.append(ids)
            mask_parts.append(mask)
            lengths.append(len(ids))
            row_of.append(k)
    total = sum(lengths)
    return _Rendered(len(items), np.fromiter(chain.from_iterable(ids_parts), np.int32, total),
                     np.fromiter(chain.from_iterable(mask_parts), np.uint8, total), np.array(lengths, np.int64),
                     np.array(row_of, np.int64), errors, dropped, truncated)


CHUNK_ROWS = 512


def default_num_proc() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ordered_map(worker, jobs: Iterable, num_proc: int | None) -> Iterator:
    """`worker(job)` for each job, in order, in `num_proc` forked processes when asked and there is
    more than one job. Jobs are drawn from the iterator only a few ahead of the results consumed, so
    a stream of rows is never read into memory whole."""
    jobs = iter(jobs)
    head = list(islice(jobs, 2))
    if not num_proc or num_proc <= 1 or len(head) < 2:
        yield from map(worker, chain(head, jobs))
        return
    import gc
    import multiprocessing

    gc.freeze()  # workers' GC would otherwise touch, and so copy, every object inherited by fork
    try:
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            pending: deque = deque()
            for job in chain(head, jobs):
                pending.append(pool.apply_async(worker, (job,)))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        gc.unfreeze()


def _map_chunks(worker, rows: list[tuple[str, object]], args: tuple, num_proc: int | None) -> list:
    """`worker((chunk_rows, *args))` over chunks of rows; the results of all rows, in input order."""
    jobs = (([r for _, r in rows[i:i + CHUNK_ROWS]], *args) for i in range(0, len(rows), CHUNK_ROWS))
    return [r for chunk in _ordered_map(worker, jobs, num_proc) for r in chunk]


def _failed(result, loc: str, on_error: str, report: LoadReport) -> bool:
    """True when `result` is an error (raised with its location, or counted as skipped)."""
    if result[0] != "error":
        return False
    _, reason, message = result
    if on_error == "raise":
        raise DataError(f"{loc}: {message}", reason)
    report.skipped[reason] += 1
    report.first_errors.setdefault(reason, f"{loc}: {message}")
    return True


def _first_row(where: str, rows: list[tuple[str, object]]) -> tuple[str, Mapping]:
    """(location, row) of the first row that is an object; the first row's error when none is."""
    for loc, r in rows:
        if isinstance(r, Mapping):
            return loc, r
    raise DataError(f"{where}: no rows to read" if not rows else f"{rows[0][0]}: {rows[0][1]}", "no rows")


def _peek_first(where: str, items: Iterator) -> tuple[str, Mapping, Iterator]:
    """`_first_row` of a stream, and the stream again from its start."""
    seen = []
    for loc, payload in items:
        seen.append((loc, _parsed(payload)))
        if isinstance(seen[-1][1], Mapping):
            return loc, seen[-1][1], chain(seen, items)
    return (*_first_row(where, seen), iter(()))


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise DataError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}", "bad option")


def _chunks(items: Iterator, n: int) -> Iterator[list]:
    items = iter(items)
    while chunk := list(islice(items, n)):
        yield chunk


def _render_into(path: Path, src: Source, format: str, opts: dict, num_proc: int | None) -> dict:
    """Render `src` into the arrays of `path` (`data.store`); returns the meta: the load report and,
    for format auto, what was detected. Memory stays bounded by a few chunks of rows."""
    get_tokenizer()  # a missing vocab is one error about the setup, not one per row
    report = LoadReport(source=src.where)
    items, detected = src.items, None
    if format == "auto":
        loc, first, items = _peek_first(src.where, items)
        try:
            format, why = detect_format(first)
        except DataError as e:
            raise DataError(f"{loc}: {e}", e.reason) from None
        if format in PAIR_FORMATS:
            raise DataError(f"{loc}: a preference row ({why}): it trains with method: dpo (data.format: auto or "
                            f"{format}), not supervised fine-tuning; for SFT on the chosen answers, give them as "
                            "messages or prompt/completion rows", "preference data")
        if format in PROMPT_FORMATS:
            raise DataError(f"{loc}: a prompts row ({why}): prompts train with method: grpo "
                            f"(data.format: auto or {format}); supervised fine-tuning needs the answer too (a "
                            "'completion' column, or messages)", "prompt data")
        announce(format, why, loc)
        detected = [format, why, loc]
    report.format = format
    on_error = opts["on_error"]
    args = (format, opts["split_turns"], opts["loss_on"], opts["reasoning_effort"], opts["max_seq_len"],
            opts["truncation"], on_error)
    writer = ExampleWriter(path)
    for chunk in _ordered_map(_render_examples_chunk, ((c, args) for c in _chunks(items, CHUNK_ROWS)),
                              default_num_proc() if num_proc is None else num_proc):
        for _, loc, reason, message in chunk.errors:
            _failed(("error", reason, message), loc, on_error, report)
        writer.append(chunk.ids, chunk.mask, chunk.lengths, report.rows + chunk.row_of)
        report.rows += chunk.rows
        report.examples += len(chunk.lengths)
        report.tokens += len(chunk.ids)
        report.trained_tokens += int(np.count_nonzero(chunk.mask))
        report.dropped.update(chunk.dropped)
        report.truncated += chunk.truncated
    writer.close()
    return {"report": {k: dict(v) if isinstance(v, dict) else v for k, v in vars(report).items()},
            "detected": detected}


def load_examples(
    source,
    format: str = "auto",
    *,
    split: str = "train",
    subset: str | None = None,
    on_error: str = "raise",
    split_turns: bool = True,
    loss_on: str = "last_turn",
    reasoning_effort: str | None = None,
    max_seq_len: int | None = None,
    truncation: str = "drop",
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Examples, LoadReport]:
    """Rows -> examples, in input order, and a report of what was skipped, dropped or truncated.

    source: a local file or folder (.jsonl/.json/.parquet/.csv), a hub dataset id, a
    `datasets.Dataset`, or a list of row dicts. format: one of `data.formats.FORMATS` or "auto"
    (decided from the first row, and said on stderr). on_error: "raise" stops at the first bad row
    with a `DataError` naming it; "skip" leaves it out and counts it in the report. Examples longer
    than `max_seq_len` are dropped (`truncation="drop"`) or cut to length (`"truncate"`; cut
    examples left with nothing to train are dropped). Dropped examples are counted, never silent.

    The examples come back as `Examples`, a sequence of `Example`s over flat, memory-mapped arrays
    (`data.store`): about 5 bytes a token. Rows stream from the files in chunks, rendered in
    `num_proc` processes (default: every core this process may use; the tokens do not depend on it).
    cache_dir: keep the render there, keyed by the data (files' path, size and mtime; a hub dataset's
    fingerprint) and every argument that changes the tokens, and reuse it: a later load with the same
    key reads it without rendering, and concurrent loads (the processes of a multi-process run) render
    it once, in whichever process comes first, while the others wait. Rows given in memory are not
    cached. None: render into a temporary file, removed once mapped.
    """
    if format in PAIR_FORMATS or format in PROMPT_FORMATS:
        raise DataError(f"format {format!r} is not for supervised fine-tuning: "
                        + (f"{format} rows train with method: dpo (data.load_pairs)" if format in PAIR_FORMATS else
                           f"{format} rows train with method: grpo (data.load_prompts)"), "bad option")
    _check("format", format, ("auto", *FORMATS))
    _check("on_error", on_error, ON_ERROR)
    _check("loss_on", loss_on, LOSS_ON)
    _check("truncation", truncation, TRUNCATION)
    _check("reasoning_effort", reasoning_effort, (None, *REASONING_EFFORTS))
    src = open_source(source, split, subset)
    opts = dict(on_error=on_error, split_turns=split_turns, loss_on=loss_on, reasoning_effort=reasoning_effort,
                max_seq_len=max_seq_len, truncation=truncation)

    def build(path: Path) -> dict:
        return _render_into(path, src, format, opts, num_proc)

    if cache_dir is None or src.identity is None:
        examples, meta = build_private(build)
        return examples, _report(meta)
    key = {"kind": "examples", "data": src.identity, "code": code_version(), "format": format, "split": split,
           "subset": subset, **opts}
    entry, meta, built = cached(Path(cache_dir), key, build)
    report = _report(meta)
    report.cache = f"{'rendered into' if built else 'read from'} {entry}"
    if not built and meta["detected"]:
        announce(*meta["detected"])
    return Examples.from_dir(entry), report


def _report(meta: dict) -> LoadReport:
    r = dict(meta["report"])
    return LoadReport(**{**r, "skipped": Counter(r["skipped"]), "dropped": Counter(r["dropped"])})


# --- preference pairs (DPO) ---

def _render_pair(row, fmt: str, loss_on: str, effort: str | None):
    """("ok", [(ids, mask) chosen, (ids, mask) rejected]) or ("error", reason, message)."""
    if isinstance(row, DataError):
        return "error", row.reason, str(row)
    try:
        prompt, chosen, rejected = preference_conversations(generic_row(row, fmt))
        prompt_ids = render_for_completion(prompt, reasoning_effort=effort)
        n = len(prompt_ids)
        sides = []
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            ids, mask = render_examples(prompt + completion, split_turns=False, loss_on=loss_on,
                                        reasoning_effort=effort)[-1]
            if ids[:n] != prompt_ids:  # the renderers' rules agree by construction; this says if they ever do not
                raise DataError(f"prompt + {name} does not start with the prompt's own tokens", "prompt mismatch")
            # The prompt is given, not generated: only the completion trains (a prompt that ends inside an
            # assistant turn, after a tool result, would otherwise train that turn's earlier messages).
            mask[:n] = [0] * n
            sides.append((ids, mask))
        return "ok", sides
    except DataError as e:
        return "error", e.reason, str(e)
    except (TypeError, AttributeError, KeyError, ValueError) as e:  # a shape no check anticipated
        return "error", "malformed row", f"malformed row ({type(e).__name__}: {e})"


def _render_pair_chunk(args):
    rows, fmt, loss_on, effort = args
    return [_render_pair(row, fmt, loss_on, effort) for row in rows]


def load_pairs(
    source,
    format: str = "preference",
    *,
    split: str = "train",
    subset: str | None = None,
    on_error: str = "raise",
    loss_on: str = "last_turn",
    reasoning_effort: str | None = None,
    max_seq_len: int | None = None,
    truncation: str = "drop",
    num_proc: int | None = None,
) -> tuple[list[PreferencePair], LoadReport]:
    """Preference rows -> pairs, in input order, and a report (format "preference", unit "pairs").

    Rows: `data.formats.preference_conversations` (explicit prompt/chosen/rejected, or chosen and
    rejected as whole conversations sharing their prompt). Each side is the prompt plus that
    completion, rendered by the SFT rules (one example ending at the completion's end); its loss mask
    covers the completion's tokens by `loss_on`, never the prompt's. Both sides start with the same
    prompt tokens (`render_for_completion` of the prompt), which is checked. A pair with a side longer
    than `max_seq_len` is dropped, or both sides are cut to it (`truncation="truncate"`; a side left
    with nothing trained drops the pair); a side with nothing to train drops the pair; all counted.
    format: "preference" (also "auto"), or a dataset mapping of that kind (`PAIR_FORMATS`). source, split, subset,
    on_error, num_proc: as for `load_examples`; a first row with neither 'chosen' nor 'rejected' is
    an error whatever on_error says (the data is not preference data).
    """
    _check("format", format, ("auto", *PAIR_FORMATS))
    format = PAIR_FORMATS[0] if format == "auto" else format
    _check("on_error", on_error, ON_ERROR)
    _check("loss_on", loss_on, LOSS_ON)
    _check("truncation", truncation, TRUNCATION)
    _check("reasoning_effort", reasoning_effort, (None, *REASONING_EFFORTS))
    get_tokenizer()
    where, rows = read_rows(source, split, subset)
    report = LoadReport(source=where, format=format, rows=len(rows), unit="pairs")
    loc, first = _first_row(where, rows)
    if format == "preference" and "chosen" not in first and "rejected" not in first:
        raise DataError(f"{loc}: not a preference row: no 'chosen' and 'rejected' columns (columns: "
                        f"{', '.join(map(str, first))}); method: dpo needs prompt/chosen/rejected rows",
                        "not preference data")

    results = _map_chunks(_render_pair_chunk, rows, (format, loss_on, reasoning_effort), num_proc)
    pairs = []
    for index, ((loc, _), result) in enumerate(zip(rows, results)):
        if _failed(result, loc, on_error, report):
            continue
        (c_ids, c_mask), (r_ids, r_mask) = result[1]
        if max_seq_len is not None and max(len(c_ids), len(r_ids)) > max_seq_len:
            if truncation == "drop":
                report.dropped[f"longer than max_seq_len={max_seq_len}"] += 1
                continue
            c_ids, c_mask, r_ids, r_mask = (x[:max_seq_len] for x in (c_ids, c_mask, r_ids, r_mask))
            if not any(c_mask) or not any(r_mask):
                report.dropped["nothing trained left after truncation"] += 1
                continue
            report.truncated += 1
        if not any(c_mask) or not any(r_mask):
            report.dropped[f"nothing to train (loss_on={loss_on})"] += 1
            continue
        pairs.append(PreferencePair(Example(c_ids, c_mask, index), Example(r_ids, r_mask, index), index))
    report.examples = len(pairs)
    report.tokens = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    report.trained_tokens = sum(sum(p.chosen.loss_mask) + sum(p.rejected.loss_mask) for p in pairs)
    return pairs, report


# --- prompts (GRPO) ---

def render_prompt(prompt, *, reasoning_effort: str | None = None) -> list[int]:
    """Token ids of a prompt as the model reads it before answering, ending with `<|start|>assistant`.

    prompt: a text (one user message), a list of messages in the `messages` row format (system ->
    developer instructions, user, assistant with `thinking`/`content`/`tool_calls`, tool results),
    or a list of `data.harmony.Message`. Earlier turns' analysis is dropped; without a system
    message the default one is used, with `reasoning_effort` (default medium).
    """
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, Message) for m in prompt):
        conv = list(prompt)
    else:
        conv = prompt_conversation({"prompt": list(prompt) if isinstance(prompt, tuple) else prompt})
    return render_for_completion(conv, reasoning_effort=reasoning_effort)


def _render_prompt_row(row, fmt: str, effort: str | None):
    """("ok", ids, columns, prompt) or ("error", reason, message)."""
    if isinstance(row, DataError):
        return "error", row.reason, str(row)
    try:
        row = generic_row(row, fmt)
        ids = render_for_completion(prompt_conversation(row), reasoning_effort=effort)
        return "ok", ids, {k: v for k, v in row.items() if k != "prompt"}, row["prompt"]
    except DataError as e:
        return "error", e.reason, str(e)
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        return "error", "malformed row", f"malformed row ({type(e).__name__}: {e})"


def _render_prompt_chunk(args):
    rows, fmt, effort = args
    return [_render_prompt_row(row, fmt, effort) for row in rows]


def load_prompts(
    source,
    format: str = "prompts",
    *,
    split: str = "train",
    subset: str | None = None,
    on_error: str = "raise",
    reasoning_effort: str | None = None,
    max_prompt_len: int | None = None,
    num_proc: int | None = None,
) -> tuple[list[PromptRow], LoadReport]:
    """Prompts rows -> `PromptRow`s, in input order, and a report (format "prompts", unit "prompts").

    A row is `{"prompt": text or messages, ...}` (`data.formats.prompt_conversation`; the `system`,
    `developer`, `tools` and `reasoning_effort` columns apply); its ids are `render_prompt`'s, and
    every other column is kept in `columns` for reward functions. Prompts longer than
    `max_prompt_len` tokens are dropped and counted. format: "prompts" (also "auto"), or a dataset mapping of that
    kind (`PROMPT_FORMATS`; the mapped row's columns reach the rewards). source, split, subset,
    on_error, num_proc: as for `load_examples`; a first row without 'prompt' is an error whatever
    on_error says.
    """
    _check("format", format, ("auto", *PROMPT_FORMATS))
    format = PROMPT_FORMATS[0] if format == "auto" else format
    _check("on_error", on_error, ON_ERROR)
    _check("reasoning_effort", reasoning_effort, (None, *REASONING_EFFORTS))
    get_tokenizer()
    where, rows = read_rows(source, split, subset)
    report = LoadReport(source=where, format=format, rows=len(rows), unit="prompts")
    loc, first = _first_row(where, rows)
    if format == "prompts" and "prompt" not in first:
        raise DataError(f"{loc}: not a prompts row: no 'prompt' column (columns: {', '.join(map(str, first))}); "
                        "method: grpo needs rows with a 'prompt'", "not prompt data")

    results = _map_chunks(_render_prompt_chunk, rows, (format, reasoning_effort), num_proc)
    prompts = []
    for index, ((loc, _), result) in enumerate(zip(rows, results)):
        if _failed(result, loc, on_error, report):
            continue
        _, ids, columns, given = result
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            report.dropped[f"prompt longer than max_prompt_len={max_prompt_len}"] += 1
            continue
        prompts.append(PromptRow(ids, columns, index, given))
    report.examples = len(prompts)
    report.tokens = sum(len(p.prompt) for p in prompts)
    return prompts, report


def train_eval_split(examples: Sequence[Example], eval_size: float | int, *, seed: int = 0
                     ) -> tuple[Sequence[Example], Sequence[Example]]:
    """Hold out whole source rows (their examples share prefixes, so splitting examples would leak):
    a fraction of rows (`0 < eval_size < 1`) or a number of rows. Both parts keep input order; for
    `Examples` they are views over the same arrays, else lists."""
    row_of = examples.row_ids() if isinstance(examples, Examples) else np.array([e.row for e in examples], np.int64)
    rows = np.unique(row_of).tolist()
    n = round(eval_size * len(rows)) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
    if not 0 <= n <= len(rows):
        raise DataError(f"eval_size {eval_size} asks for {n} of {len(rows)} rows", "bad option")
    held = np.isin(row_of, random.Random(seed).sample(rows, n))
    if isinstance(examples, Examples):
        return examples.select(np.flatnonzero(~held)), examples.select(np.flatnonzero(held))
    return [e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]


def shuffle(items: Sequence, seed: int) -> list:
    """A seeded shuffle (of examples or packed rows), reproducible across runs and machines."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


# --- packing and batching ---

def pack_examples(examples: Sequence[Example], seq_len: int) -> PackedRows:
    """Pack examples into rows of at most `seq_len` tokens, never splitting one (best fit, longest
    first: each example goes to the row with the least room that holds it, the earliest such row on a
    tie). Rows come out grouped by length; shuffle rows, not examples, between epochs. Only the
    lengths are read (`Examples.lengths` for the arrays); the rows are index arrays (`PackedRows`)."""
    lengths = examples.lengths() if isinstance(examples, Examples) else np.array([len(e) for e in examples], np.int64)
    order = np.argsort(-lengths, kind="stable")
    if len(order) and lengths[order[0]] > seq_len:
        raise DataError(f"an example of {lengths[order[0]]} tokens (row {examples[int(order[0])].row}) does not fit "
                        f"seq_len={seq_len}; set max_seq_len to drop or truncate long examples", "example too long")
    # Rows with room left, by room: the sorted distinct amounts of room, and for each a heap of rows.
    rooms: list[int] = []
    rows_with: dict[int, list[int]] = {}
    row_of = np.empty(len(order), np.int64)  # the row of the k-th example packed
    n_rows = 0
    for k, n in enumerate(lengths[order].tolist()):
        j = bisect_left(rooms, n)
        if j < len(rooms):
            left = rooms[j]
            r = heapq.heappop(rows_with[left])
            if not rows_with[left]:
                del rooms[j], rows_with[left]
        else:
            left, r = seq_len, n_rows
            n_rows += 1
        row_of[k] = r
        if left > n:
            if left - n not in rows_with:
                insort(rooms, left - n)
                rows_with[left - n] = []
            heapq.heappush(rows_with[left - n], r)
    by_row = np.argsort(row_of, kind="stable")  # keeps each row's examples in the order they were placed
    starts = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=starts[1:])
    return PackedRows(examples, order[by_row], starts)


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
