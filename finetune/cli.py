"""`gptoss-ft`: the one place that parses argv. One table of subcommands; option choices come from
the library modules that implement them (`data.formats.FORMATS`, `model.lora.TARGETS`, ...), and
each handler imports what only it needs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from data import DataError
from data.formats import FORMATS as DATA_FORMATS
from data.formats import PAIR_FORMATS, PROMPT_FORMATS
from data.harmony import LOSS_ON, REASONING_EFFORTS
from data.pipeline import ON_ERROR
from model.checkpoint import LAYOUTS, CheckpointError
from model.config import PRESETS
from model.config import ConfigError as ModelConfigError
from model.experts import EXPERT_FORMATS

from .config import DTYPES, TRAINABLE, ConfigError
from .export import FORMATS as EXPORT_FORMATS
from .export import REQUANT
from .plan import DEVICES, PlanError
from .run import RunError


def _init_args(p: argparse.ArgumentParser) -> None:
    # no argparse choices: the library's error suggests the closest preset
    p.add_argument("--preset", default="tiny", help=f"{', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--out", required=True, help="directory to write (replaced atomically if it exists)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=LAYOUTS, default="hf")
    p.add_argument("--experts", choices=EXPERT_FORMATS, default="mxfp4",
                   help="store experts as MXFP4 blocks/scales (as released) or dequantized bf16")


def _init(args: argparse.Namespace) -> int:
    from model.checkpoint import write_random
    from model.config import preset

    out = write_random(args.out, preset(args.preset), seed=args.seed, layout=args.layout, experts=args.experts)
    print(f"wrote a random {args.preset} gpt-oss ({args.layout} layout, {args.experts} experts) to {out}")
    return 0


def _render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a local JSON/JSONL/Parquet/CSV file or folder, or a hub dataset id")
    p.add_argument("--format", default="auto", choices=("auto", *DATA_FORMATS, *PAIR_FORMATS, *PROMPT_FORMATS),
                   help="row format (default: auto, decided from the first row); preference: DPO pairs, "
                        "both sides shown; prompts: GRPO prompts; a dataset's name (xlam, gsm8k, ...): its "
                        "row mapping (data/mappings.py, `gptoss-ft recipes`)")
    p.add_argument("--jsonl", action="store_true",
                   help='one {"input_ids": [...], "loss_mask": [...]} per example on stdout, in input order; '
                        'preference: {"chosen": {...}, "rejected": {...}} per pair; '
                        'prompts: {"prompt_ids": [...], "columns": {...}} per row')
    p.add_argument("--no-split-turns", action="store_true",
                   help="one example per row (its last assistant turn) instead of one per assistant turn")
    p.add_argument("--loss-on", choices=LOSS_ON, default="last_turn")
    p.add_argument("--on-error", choices=ON_ERROR, default="raise")
    p.add_argument("--reasoning-effort", choices=REASONING_EFFORTS, default=None)
    p.add_argument("--split", default="train", help="dataset split for hub ids (default: train)")
    p.add_argument("--subset", default=None, help="dataset subset (configuration) for hub ids, e.g. main for openai/gsm8k")
    p.add_argument("--limit", type=int, default=None, help="human view: show only the first N examples")


def _render(args: argparse.Namespace) -> int:
    """Examples (pairs, prompts) as JSONL on stdout, or a human view with trained spans highlighted."""
    from data import load_examples, load_pairs, load_prompts

    kind = ("pairs" if args.format in PAIR_FORMATS else "prompts" if args.format in PROMPT_FORMATS
            else "examples")
    if kind == "examples":
        try:
            items, report = load_examples(
                args.file, args.format, split=args.split, subset=args.subset, on_error=args.on_error,
                split_turns=not args.no_split_turns, loss_on=args.loss_on, reasoning_effort=args.reasoning_effort,
            )
        except DataError as e:  # format auto on DPO or GRPO rows: show them as such
            if args.format != "auto" or e.reason not in ("preference data", "prompt data"):
                raise
            kind = "pairs" if e.reason == "preference data" else "prompts"
            fmt, what = ((PAIR_FORMATS[0], "a preference row") if kind == "pairs"
                         else (PROMPT_FORMATS[0], "a prompt row"))
            print(f"data: format auto -> {fmt} ({what} in {str(e).split(': ', 1)[0]})", file=sys.stderr)
            args.format = fmt
    if kind == "pairs":
        items, report = load_pairs(args.file, args.format, split=args.split, subset=args.subset,
                                   on_error=args.on_error, loss_on=args.loss_on, reasoning_effort=args.reasoning_effort)
    elif kind == "prompts":
        items, report = load_prompts(args.file, args.format, split=args.split, subset=args.subset,
                                     on_error=args.on_error, reasoning_effort=args.reasoning_effort)
    try:
        if args.jsonl:
            write = sys.stdout.write
            for item in items:
                write(json.dumps(_jsonl_record(kind, item), ensure_ascii=False, default=str) + "\n")
            sys.stdout.flush()
        elif kind == "pairs":
            _show_pairs(items, args.limit)
        elif kind == "prompts":
            _show_prompts(items, args.limit)
        else:
            _show_examples(items, args.limit)
    except BrokenPipeError:  # `| head` closed the pipe: not an error
        sys.stdout = open(os.devnull, "w")
    print(report, file=sys.stderr)
    for message in report.first_errors.values():
        print(f"  first skipped: {message}", file=sys.stderr)
    return 0


def _jsonl_record(kind: str, item) -> dict:
    if kind == "pairs":
        return {side: {"input_ids": e.input_ids, "loss_mask": e.loss_mask}
                for side, e in (("chosen", item.chosen), ("rejected", item.rejected))}
    if kind == "prompts":
        return {"prompt_ids": item.prompt, "columns": item.columns}
    return {"input_ids": item.input_ids, "loss_mask": item.loss_mask}


def _styled(ids: list[int], mask: list[int]):
    """The text of token ids: trained tokens green, special tokens cyan, one message per line."""
    from rich.text import Text

    from data.tokenizer import CALL, END, RETURN, STARTOFTEXT, get_tokenizer

    tok = get_tokenizer()
    text = Text()
    start = 0
    for i in range(1, len(ids) + 1):  # spans of equal mask and kind (special or not), cut after each message
        ends_message = ids[i - 1] in (END, RETURN, CALL)
        if (i < len(ids) and not ends_message and mask[i] == mask[start]
                and (ids[i] >= STARTOFTEXT) == (ids[start] >= STARTOFTEXT)):
            continue
        piece = tok.decode(ids[start:i])
        special = ids[start] >= STARTOFTEXT
        style = ("bold green" if mask[start] else "") + (" cyan" if special else "")
        text.append(piece, style=style.strip() or None)
        if ends_message and i < len(ids):
            text.append("\n")  # one message per line; the tokens have no newline here
        start = i
    return text


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _more(console, shown: int, total: int, unit: str) -> None:
    if shown < total:
        console.print(f"... {total - shown} more {unit} (raise --limit to see them)", style="dim")


LEGEND = "[green bold]green[/]: trained tokens (loss mask 1); [cyan]cyan[/]: special tokens"


def _show_examples(examples, limit: int | None) -> None:
    """One rule per example, then its text: trained tokens green, special tokens cyan, one message per line."""
    console = _console()
    shown = examples[:limit] if limit is not None else examples
    for k, e in enumerate(shown):
        console.rule(f"example {k} (row {e.row}): {len(e)} tokens, {sum(e.loss_mask)} trained", style="dim")
        console.print(_styled(e.input_ids, e.loss_mask), soft_wrap=True)
    _more(console, len(shown), len(examples), "examples")
    console.print(LEGEND, style="dim")


def _show_pairs(pairs, limit: int | None) -> None:
    """Each pair's chosen example, then its rejected one, each under a labelled rule."""
    console = _console()
    shown = pairs[:limit] if limit is not None else pairs
    for k, p in enumerate(shown):
        for side, e in (("chosen", p.chosen), ("rejected", p.rejected)):
            console.rule(f"pair {k} (row {p.row}) {side}: {len(e)} tokens, {sum(e.loss_mask)} trained", style="dim")
            console.print(_styled(e.input_ids, e.loss_mask), soft_wrap=True)
    _more(console, len(shown), len(pairs), "pairs")
    console.print(LEGEND, style="dim")


def _show_prompts(prompts, limit: int | None) -> None:
    """Each prompt's text (what the model reads before it answers), then its other columns."""
    console = _console()
    shown = prompts[:limit] if limit is not None else prompts
    for k, p in enumerate(shown):
        console.rule(f"prompt {k} (row {p.row}): {len(p.prompt)} tokens", style="dim")
        console.print(_styled(p.prompt, [0] * len(p.prompt)), soft_wrap=True)
        if p.columns:
            console.print("columns: " + json.dumps(p.columns, ensure_ascii=False, default=str), style="dim",
                          soft_wrap=True, markup=False)
    _more(console, len(shown), len(prompts), "prompts")
    console.print("[cyan]cyan[/]: special tokens; the model answers after the last <|start|>assistant",
                  style="dim", soft_wrap=True)


def _recipes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per recipe instead of the table")
    p.add_argument("--markdown", action="store_true", help="the table in Markdown (as the README shows it)")


RECIPE_COLUMNS = ("recipe", "dataset", "method", "what the model learns", "hardware", "20b GiB", "120b GiB")
PLANNED_MODELS = ("openai/gpt-oss-20b", "openai/gpt-oss-120b")


def recipe_summary(path) -> dict:
    """A recipe as `gptoss-ft train` reads it (with its hardware file): its dataset, method, what it
    teaches, its default hardware, and the peak memory per GPU planned for each of PLANNED_MODELS
    (the model swapped in, nothing offloaded)."""
    import yaml

    from . import config as cfglib
    from .plan import plan_run

    cfg = cfglib.load(path, check_paths=False)  # a listing reads no data and no model
    d = cfg.data
    root = path.resolve().parent.parent  # the repository: local data is shown relative to it
    train = os.path.relpath(d.train, root) if Path(d.train).is_absolute() and Path(d.train).is_relative_to(root) else d.train
    # A recipe on a random model built on the spot (init_preset: the quickstarts) is not planned at full size.
    planned = None if cfg.model.init_preset else {
        m: round(plan_run(config=cfg, model=m).peak_bytes / 2**30, 1) for m in PLANNED_MODELS}
    return {"name": path.stem, "path": str(path), "method": cfg.method if cfg.method in TRAINABLE else
            f"{cfg.method} ({cfg.tuning})", "learns": cfg.description,
            "dataset": train + (f" ({d.subset})" if d.subset else "") + (f" [{d.split}]" if d.split != "train" else ""),
            "hardware": (yaml.safe_load(path.read_text()) or {}).get("hardware"), "planned_gib": planned}


def _recipes(args: argparse.Namespace) -> int:
    """The recipes in recipes/: dataset, method, what the model learns, planned memory."""
    import recipes

    found = [recipe_summary(p) for p in recipes.paths()]
    if args.json:
        for r in found:
            print(json.dumps(r))
        return 0
    rows = [(r["name"], r["dataset"], r["method"], r["learns"], os.path.basename(r["hardware"] or "-"),
             *(f"{r['planned_gib'][m]:.1f}" if r["planned_gib"] else "-" for m in PLANNED_MODELS)) for r in found]
    note = ("GiB: planned peak memory per GPU with the recipe's hardware file and the model swapped, no "
            "experts offloaded (`gptoss-ft plan --config recipes/NAME.yaml --fit GIB` fits a smaller GPU); "
            "the quickstarts run a tiny random model on CPU.")
    if args.markdown:
        print("| " + " | ".join(RECIPE_COLUMNS) + " |")
        print("|" + "|".join("---:" if c.endswith("GiB") else "---" for c in RECIPE_COLUMNS) + "|")
        for row in rows:
            print("| " + " | ".join(f"`{c}`" if i in (0, 1, 4) else c for i, c in enumerate(row)) + " |")
        print(f"\n{note}")
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape("gptoss-ft train recipes/NAME.yaml [hardware=configs/FILE.yaml] [key=value ...]"))
    for col in RECIPE_COLUMNS:
        t.add_column(col, justify="right" if col.endswith("GiB") else "left")
    for row in rows:
        t.add_row(*map(escape, row))
    console = Console()
    console.print(t)
    console.print(escape(note), style="dim")
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a recipe (recipes/*.yaml) or any YAML config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")


def _train(args: argparse.Namespace) -> int:
    from .trainer import train

    train(args.config, args.overrides, resume=args.resume)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by `gptoss-ft train` (gguf: or a checkpoint directory)")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                   help="adapter: PEFT directory + README; merged: bf16 HF checkpoint with the LoRA folded in; "
                        "mxfp4: merged, experts requantized to MXFP4 (unchanged experts byte-identical); "
                        "gguf: the mxfp4 model as one GGUF file for llama.cpp/Ollama/LM Studio, Modelfile beside it")
    p.add_argument("--out", required=True,
                   help="directory to write (replaced atomically if it exists); gguf: a FILE.gguf")
    p.add_argument("--base", default=None,
                   help="the run's base checkpoint when it is not where the run recorded it (a moved or copied "
                        "run); it must be the same model: its fingerprint is checked")
    p.add_argument("--layout", choices=LAYOUTS, default="hf",
                   help="original: OpenAI's layout (mxfp4 only)")
    p.add_argument("--requant", choices=REQUANT, default="gptq",
                   help="mxfp4: error-aware GPTQ rounding on calibration tokens (default) or plain nearest")
    p.add_argument("--calib-tokens", type=int, default=2048, help="mxfp4/gptq: training tokens to calibrate on")
    p.add_argument("--calib-data", default=None, help="mxfp4/gptq: calibration data (default: the run's data.train)")


def _export(args: argparse.Namespace) -> int:
    from .export import export

    r = export(args.run_dir, args.format, args.out, base=args.base, layout=args.layout, requant=args.requant,
               calib_tokens=args.calib_tokens, calib_data=args.calib_data,
               progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.format == "gguf":
        print(f"wrote {r.path} ({r.tensors} tensors; {r.experts_copied} expert projections copied, "
              f"{r.experts_requantized} requantized) and {r.modelfile}")
        return 0
    detail = ""
    if args.format == "mxfp4":
        detail = (f"; {r.experts_copied} expert projections copied from the base, {r.experts_requantized} "
                  f"requantized ({args.requant}" + (f", {r.calibration_tokens} calibration tokens)" if r.calibration_tokens else ")"))
    print(f"wrote {args.format} export to {r.path}{detail}")
    return 0


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="gpt-oss-20b, gpt-oss-120b (or their hub ids), or a checkpoint directory")
    p.add_argument("--config", help="a training config: plan it as `gptoss-ft train` would run it (flags override)")
    p.add_argument("overrides", nargs="*", help="with --config: dotted key=value overrides, e.g. lora.targets=[attention]")
    p.add_argument("--method", choices=TRAINABLE, default=None, help="what trains (default lora)")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048")
    p.add_argument("--batch-size", type=int, default=None, help="default 1")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--device", choices=DEVICES, default="cuda",
                   help="cuda: GPU memory per device; cpu: the peak RSS of a CPU run")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="model.dtype (default: the config's, else auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (attention + experts), default 16")
    p.add_argument("--offload-experts", type=int, default=None, metavar="N",
                   help="layers whose MXFP4 experts stay in CPU memory (model.offload_experts), default 0")
    p.add_argument("--no-offload-embeddings", action="store_true",
                   help="keep the input embedding on the GPU (model.offload_embeddings: false)")
    p.add_argument("--offload-activations", action="store_true",
                   help="checkpointed layer inputs in CPU memory (model.offload_activations; long context)")
    p.add_argument("--moe-chunk-size", type=int, default=None, metavar="TOKENS",
                   help="the MoE over chunks of TOKENS tokens (model.moe_chunk_size; long context)")
    p.add_argument("--fit", type=float, default=None, metavar="GIB",
                   help="offload the fewest expert layers that bring the peak to GIB or less")
    p.add_argument("--json", action="store_true", help='print {"peak_gib": ..., "breakdown": {...}} instead of a table')


def _plan(args: argparse.Namespace) -> int:
    from .plan import plan_run, render_table

    if args.overrides and not args.config:
        raise PlanError("key=value overrides apply to --config")
    p = plan_run(config=args.config, overrides=args.overrides, fit_gib=args.fit, model=args.model,
                 method=args.method, seq_len=args.seq_len, batch_size=args.batch_size,
                 gradient_checkpointing=args.gradient_checkpointing or None, lora_r=args.lora_r,
                 offload_experts=args.offload_experts, offload_embeddings=False if args.no_offload_embeddings else None,
                 gpus=args.gpus, device=args.device, dtype=args.dtype,
                 offload_activations=args.offload_activations or None, moe_chunk_size=args.moe_chunk_size)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        render_table(p)
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory, or a checkpoint directory / hub id")
    p.add_argument("--adapter", default=None, help="a PEFT adapter directory to put on the model")
    p.add_argument("--base", default=None,
                   help="a LoRA run's base checkpoint when it is not where the run recorded it; its fingerprint is checked")
    p.add_argument("--reasoning", choices=REASONING_EFFORTS, default="medium", help="reasoning effort")
    p.add_argument("--prompt", default=None, help="answer this one message and exit (default: interactive)")
    p.add_argument("--system", default=None,
                   help="instructions, as a `system` row of the messages format (a Harmony developer message)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default, reproducible); OpenAI suggests 1.0 for the released models")
    p.add_argument("--seed", type=int, default=0)


def _chat(args: argparse.Namespace) -> int:
    import torch

    from .generate import chat_prompt, generate, load_for_inference, parse_completion

    model = load_for_inference(args.model, adapter=args.adapter, base=args.base)
    gen = torch.Generator().manual_seed(args.seed)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        prompt = chat_prompt(history, reasoning_effort=args.reasoning)
        reply = parse_completion(generate(model, prompt, max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature, generator=gen))
        for m in reply.messages:
            label = m.channel or "?"
            if m.recipient:
                label += f" to={m.recipient}"
            print(f"[{label}] {m.content}" + ("" if m.terminator is not None else "  [cut at --max-new-tokens]"))
        # Later turns see earlier finals but never their analysis (Harmony drops it).
        history.append({"role": "assistant", "content": reply.final or ""})

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print("gptoss-ft chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        answer(text)
    return 0


# name -> (help, add arguments, handler)
COMMANDS: dict[str, tuple[str, Callable, Callable[[argparse.Namespace], int]]] = {
    "train": ("fine-tune from a YAML config (LoRA or full)", _train_args, _train),
    "export": ("write an adapter, a merged model, or an MXFP4 model from a run", _export_args, _export),
    "render": ("show what the model sees and what is trained, for a dataset", _render_args, _render),
    "recipes": ("list the recipes for public datasets, with planned memory", _recipes_args, _recipes),
    "plan": ("predict peak memory for a model, method and batch", _plan_args, _plan),
    "chat": ("talk to a model or a fine-tuned run", _chat_args, _chat),
    "init": ("write a random gpt-oss checkpoint (tiny by default) for tests and the quickstart", _init_args, _init),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptoss-ft", description="Fine-tune OpenAI's gpt-oss models (LoRA or full) on Harmony-rendered data."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_args, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault: printed as one line, no traceback."""
    from .state import StateError
    from .trainer import TrainingError

    return (CheckpointError, ModelConfigError, ConfigError, DataError, StateError, TrainingError, RunError, PlanError,
            FileNotFoundError, PermissionError, IsADirectoryError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except _user_errors() as e:
        if os.environ.get("GPTOSS_FT_DEBUG"):
            raise
        print(f"gptoss-ft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
