"""Training configuration: YAML in, frozen dataclasses out.

Strict by design: an unknown key is an error that names it and suggests the closest valid one, a
value of the wrong type names its key, and missing files are reported before any work starts.
`key=value` overrides on the command line use dotted keys (`train.lr=1e-4`, `lora.targets=[attention]`);
values are parsed as YAML. Each field is documented once, here.

A recipe (recipes/*.yaml) says what to train and a hardware file (configs/*.yaml) on which model and
machine: a config's top-level `hardware: FILE`, or a `hardware=FILE` override, merges that file's keys
under the config's own (`with_hardware`).

Paths (`INPUT_PATHS`, `OUTPUT_PATHS`) become absolute when a config is read, so a run's config.yaml
says exactly what it read and wrote wherever it is used from: what a run reads resolves against the
directory of the config file that names it; where it writes (`output_dir`), and anything given as a
`key=value` override, against the current directory. Hub ids stay hub ids.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.formats import FORMATS as DATA_FORMATS
from data.formats import PAIR_FORMATS, PROMPT_FORMATS
from data.harmony import LOSS_ON, REASONING_EFFORTS
from data.pipeline import ON_ERROR, TRUNCATION
from model.experts import EXPERT_FORMATS
from model.lora import TARGETS as LORA_TARGETS

from .dpo import LOSSES as DPO_LOSSES
from .export import FORMATS as EXPORT_FORMATS

DTYPES = ("auto", "float32", "bfloat16")
"""model.dtype: auto is bfloat16 on GPU and float32 on CPU."""
METHODS = ("lora", "full", "dpo", "grpo")
"""lora / full: supervised fine-tuning of LoRA adapters on a frozen base / of every weight (needs
model.experts: dequantized); dpo: preference tuning (arXiv:2305.18290); grpo: reinforcement learning
from reward functions (arXiv:2402.03300). dpo and grpo train what `trainable` says."""
TRAINABLE = ("lora", "full")
"""What a run trains: LoRA adapters, or every weight."""


INPUT_PATHS = ("model.path", "model.adapter", "data.train", "data.eval", "evaluate.generate", "grpo.rewards")
"""Keys naming what a run reads. A relative value in a config file resolves against that file's
directory; one given as a key=value override, or in a config built in code, against the current
directory. A value that is not there and looks like a hub id (`org/name`) stays a hub id
(model.path with init_preset is always a local path). grpo.rewards: the `FILE.py:function` entries."""
OUTPUT_PATHS = ("output_dir", "data.cache_dir")
"""Keys naming where a run writes: a relative value resolves against the current directory (the run
lands where you start it, as `runs/NAME` in the shipped configs)."""


class ConfigError(ValueError):
    """A training config that cannot run; the message names the key (and file)."""


@dataclass(frozen=True)
class ModelSection:
    path: str
    """HF-format directory (MXFP4 or bf16), original-format directory, or hub id."""
    revision: str | None = None
    """When `path` is a hub id: the commit, branch or tag to use (default: the newest). A run's
    config.yaml records the commit it trained on."""
    experts: Literal[EXPERT_FORMATS] = "mxfp4"
    """mxfp4: experts stay frozen in MXFP4 and are decoded on the fly (LoRA only); dequantized: dense experts."""
    dtype: Literal[DTYPES] = "auto"
    """Weights and compute dtype; auto = bfloat16 on GPU, float32 on CPU."""
    init_preset: str | None = None
    """When `path` does not exist, write a random checkpoint of this preset there first (e.g. tiny)."""
    init_seed: int = 0
    """Seed of that random checkpoint."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward instead of keeping its activations."""
    offload_activations: bool = False
    """Long context, with gradient checkpointing: the layer inputs that checkpointing keeps (one
    [tokens, hidden] tensor per layer: 16.9 GiB for gpt-oss-20b at 128k tokens) wait in CPU memory
    (pinned on GPU machines), copied back for each layer's backward. On a CPU run it changes nothing."""
    moe_chunk_size: int | None = None
    """Long context: run each MoE block over chunks of this many tokens, each recomputed in backward,
    so no [tokens, intermediate] tensor of the whole sequence exists (the MoE's own activations grow
    with the chunk, not the sequence); the MoE forward then runs once more. null: no chunking."""
    offload_embeddings: bool = True
    """LoRA on one GPU: keep the frozen input embedding table (1.1 GiB for gpt-oss) in CPU memory;
    each batch's rows are gathered there and copied over. Ignored on CPU and with several processes."""
    offload_experts: int | Literal["auto"] = "auto"
    """LoRA on one GPU with mxfp4 experts: decoder layers (spread over the depth) whose MXFP4 experts
    stay in pinned CPU memory and are copied to the GPU expert by expert when used, in forward and
    backward. Each saves 0.39 GiB (20b) / 1.58 GiB (120b) of GPU memory for that PCIe traffic.
    auto: the fewest layers with which `gptoss-ft plan` fits the run in the GPU's memory (none on a
    GPU large enough); `gptoss-ft plan --config CONFIG --fit GIB` shows the choice for a GPU size."""
    adapter: str | None = None
    """A PEFT adapter directory (a run's adapter/, or an export) to start from instead of fresh LoRA
    weights; its rank, alpha, rsLoRA and targets replace the lora section's. SFT, then DPO or GRPO
    from its adapter, is the usual pipeline."""


@dataclass(frozen=True)
class DataSection:
    train: str
    """Local JSON/JSONL/Parquet/CSV file or folder, or a hub dataset id."""
    eval: str | None = None
    """Held-out data in the same form; when absent, `eval_fraction` of train is held out."""
    eval_fraction: float = 0.0
    """Fraction of the training rows held out for eval when `eval` is not given (seeded)."""
    format: Literal[("auto", *DATA_FORMATS, *PAIR_FORMATS, *PROMPT_FORMATS)] = "auto"
    """Row format (`data.formats`); auto decides from the first row (and the method: preference pairs
    for dpo, prompts for grpo)."""
    max_seq_len: int = 2048
    """Longest example, in tokens; also the packed row length."""
    truncation: Literal[TRUNCATION] = "drop"
    """What happens to longer examples (counted and reported either way)."""
    packing: bool = True
    """Pack several examples into each row of max_seq_len (attention never crosses examples)."""
    split_turns: bool = True
    """One example per assistant turn (every turn's reasoning is trained) instead of one per row."""
    loss_on: Literal[LOSS_ON] = "last_turn"
    """Which tokens are trained; all_assistant also trains earlier finals that end in <|end|> (risky)."""
    reasoning_effort: Literal[REASONING_EFFORTS] | None = None
    """Default reasoning effort in the system message when a row does not set one."""
    on_error: Literal[ON_ERROR] = "raise"
    """Bad rows stop the run (naming file and line), or are skipped and counted per reason."""
    split: str = "train"
    """Split of a hub dataset to read for training."""
    subset: str | None = None
    """Subset (configuration) of a hub dataset, for those that have several (openai/gsm8k: main);
    the same for train and eval."""
    eval_split: str = "train"
    """Split of `eval` to read when it is a hub dataset (e.g. test_prefs); local files have only train."""
    num_proc: int | None = None
    """Processes that render the rows (SFT data); default: every core. The tokens do not depend on it."""
    cache: bool = True
    """SFT data: keep the rendered token ids and loss masks (.npy arrays) in cache_dir, keyed by the data
    files (path, size, mtime) or hub dataset fingerprint and every data option that changes the tokens,
    so a second run, a resumed run and the other processes of a multi-process run read them instead of
    rendering again (one process renders, the others wait)."""
    cache_dir: str | None = None
    """Where the cache lives; default $GPTOSS_FT_CACHE/data, else ~/.cache/gptoss-ft/data."""


@dataclass(frozen=True)
class LoraSection:
    r: int = 16
    alpha: float = 32.0
    """LoRA scale is alpha / r."""
    dropout: float = 0.0
    targets: tuple[Literal[LORA_TARGETS], ...] = ("attention", "experts")
    """Which weights get adapters: attention (q, k, v, o), experts (gate_up, down; per expert), router."""
    use_rslora: bool = False
    """rsLoRA (arXiv:2312.03732): scale alpha / sqrt(r) instead of alpha / r, so higher ranks keep learning."""


@dataclass(frozen=True)
class TrainSection:
    max_steps: int | None = None
    """Optimizer steps; when unset, `epochs` decides."""
    epochs: float | None = None
    """Passes over the training data (used when max_steps is unset; 1 when both are unset)."""
    batch_size: int = 1
    """Rows per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = batch_size * grad_accum * processes."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    """The schedule decays to lr * min_lr_ratio."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null disables clipping."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on GPU, and on CPU when model.dtype is bfloat16; fp32 otherwise."""
    seed: int = 0
    save_every: int | None = None
    """Checkpoint every N optimizer steps (and at the end); null: only at the end."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (the newest ones)."""
    eval_every: int | None = None
    """Eval loss every N steps (and at the end) when there is eval data."""
    log_every: int = 1
    qat: bool = False
    """Quantization-aware training: experts pass through MXFP4 fake-quant in forward (straight-through)."""
    aux_loss_coef: float = 0.0
    """Router load-balancing loss weight (Switch Transformer, arXiv:2101.03961); 0 disables it."""
    max_bad_steps: int = 5
    """Non-finite loss or gradients skip the step; this many in a row stop the run."""


@dataclass(frozen=True)
class WandbSection:
    enabled: bool = False
    project: str = "gptoss-ft"
    name: str | None = None
    mode: Literal["online", "offline"] | None = None
    """Overrides WANDB_MODE when set; offline works with no account."""


@dataclass(frozen=True)
class EvaluateSection:
    generate: str | None = None
    """Held-out rows (in data.format; for dpo and grpo, conversations in any SFT format) whose last
    assistant turn ends in a final answer: the model greedily completes each prompt and
    `summary.json` reports exact-match accuracy of the final."""
    limit: int | None = None
    """Use at most this many held-out rows."""
    max_new_tokens: int = 64
    before_training: bool = True
    """Also measure the base model first (`base_accuracy`)."""


@dataclass(frozen=True)
class ExportSection:
    formats: tuple[Literal[EXPORT_FORMATS], ...] = ()
    """Exports written to output_dir/export/FORMAT after training (gguf: export/gguf/model.gguf);
    merged and mxfp4 are also measured with evaluate.generate (`merged_accuracy`, `mxfp4_accuracy`)."""


@dataclass(frozen=True)
class DpoSection:
    beta: float = 0.1
    """Strength of the pull towards the reference model (the implicit reward's scale)."""
    loss: Literal[DPO_LOSSES] = "sigmoid"
    """sigmoid: DPO; ipo: IPO (arXiv:2310.12036, length-normalised as in TRL); hinge: SLiC."""
    reference: Literal["initial", "base"] = "initial"
    """The reference policy, whose log-probs are computed once before training (`reference_logps.safetensors`
    in the run; no second model in memory). initial: the model as training starts, i.e. the base
    with fresh (zero) adapters, or with model.adapter on: the SFT policy, as in the DPO paper and
    TRL. base: the base model with the adapters switched off even when model.adapter is set."""


@dataclass(frozen=True)
class GrpoSection:
    rewards: tuple[str, ...] = ()
    """Reward functions: "module:function" (imported; the module may be a .py path), or a built-in:
    exact_match, numeric_match, format (finetune/rewards.py). Each is called as
    f(completions=[...], prompts=[...], **columns) -> list of floats."""
    reward_weights: tuple[float, ...] | None = None
    """Weight of each reward in the sum (default: 1 each)."""
    num_generations: int = 8
    """Completions sampled per prompt (the group whose mean and std normalise the advantages)."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    """KL penalty to the reference (the base with adapters off), per token (k3 estimator); 0 skips
    the reference forward."""
    clip_eps: float = 0.2
    """PPO clip range of the policy ratio."""
    scale_rewards: bool = True
    """Divide each group's advantages by its reward std (GRPO); false keeps them unscaled (Dr. GRPO,
    arXiv:2503.20783)."""
    max_prompt_len: int = 1024
    """Longer prompts are dropped (and counted)."""
    log_rollouts: int = 4
    """Rollouts written to rollouts.jsonl (and wandb) at each logging step."""


@dataclass(frozen=True)
class Config:
    model: ModelSection
    data: DataSection
    output_dir: str
    """Where config.yaml, metrics.jsonl, checkpoints/ and adapter/ or model/ are written."""
    method: Literal[METHODS] = "lora"
    trainable: Literal[TRAINABLE] | None = None
    """lora or full; default: full for method full, lora otherwise."""
    description: str = ""
    """One line on what the run teaches the model (a recipe's, listed by `gptoss-ft recipes`)."""
    lora: LoraSection = field(default_factory=LoraSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    grpo: GrpoSection = field(default_factory=GrpoSection)
    train: TrainSection = field(default_factory=TrainSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    export: ExportSection = field(default_factory=ExportSection)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @property
    def tuning(self) -> str:
        """What trains: "lora" or "full"."""
        return self.trainable or ("full" if self.method == "full" else "lora")

    @property
    def objective(self) -> str:
        """"sft", "dpo" or "grpo"."""
        return self.method if self.method in ("dpo", "grpo") else "sft"

def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# -- building dataclasses from plain data, with errors that name the key ------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}{hint}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, d: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in d:
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {prefix}{k}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in d:
            kwargs[name] = _coerce(d[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {prefix}{name}")
    return cls(**kwargs)


# -- YAML, overrides, checks ---------------------------------------------------------------------------

def apply_override(d: dict[str, Any], assignment: str) -> None:
    """`a.b.c=value` into nested dict `d`; value parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse {raw!r} ({e})") from None
    parts = key.strip().split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.count("/") != 1 or Path(path).suffix != ""


def resolve_paths(d: dict[str, Any], relative_to: Path, *, only: str | None = None, check: bool = True) -> None:
    """Make the relative local paths of plain config data `d` absolute, in place (module docstring):
    inputs against `relative_to`, outputs against the current directory. `only`: just the path keys
    at or under this dotted key (an override's). `check`: a missing input that exists relative to the
    current directory instead is an error that says how to write it."""
    cwd = Path.cwd()
    for key in (*INPUT_PATHS, *OUTPUT_PATHS):
        if only is not None and key != only and not key.startswith(only + "."):
            continue
        *parents, leaf = key.split(".")
        node = d
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if key == "grpo.rewards" and isinstance(value, list):  # the "FILE.py:function" entries
            node[leaf] = [_reward_path(r, relative_to) if isinstance(r, str) else r for r in value]
        elif not isinstance(value, str):
            continue  # absent, or of a type _build reports
        elif key in OUTPUT_PATHS:
            node[leaf] = os.path.abspath(Path(value).expanduser())
        elif key == "grpo.rewards":
            node[leaf] = _reward_path(value, relative_to)
        else:
            local = key == "model.path" and node.get("init_preset") is not None
            node[leaf] = _input_path(key, value, relative_to, local=local, check=check and relative_to != cwd)


def _input_path(key: str, value: str, relative_to: Path, *, local: bool, check: bool) -> str:
    path = Path(value).expanduser()
    if path.is_absolute():
        return os.path.normpath(path)
    there = relative_to / path
    if check and not local and not there.exists() and path.exists():
        raise ConfigError(f"{key}: {value!r} is not in the config file's directory {relative_to}/, which paths in "
                          f"a config resolve against, but is in the current directory; write it relative to the "
                          f"config file (or absolute), or pass {key}={value} on the command line")
    if not (local or there.exists() or _looks_local(value)):
        return value  # a hub id
    return os.path.abspath(there)


def _reward_path(spec: str, relative_to: Path) -> str:
    module, sep, fn = spec.rpartition(":")
    if not sep or not module.endswith(".py") or Path(module).expanduser().is_absolute():
        return spec
    return f"{os.path.abspath(relative_to / Path(module).expanduser())}:{fn}"


def check(cfg: Config, *, paths: bool = True) -> None:
    """What can be known before any work starts: impossible combinations and (with `paths`) missing inputs."""
    check_combinations(cfg)
    if paths:
        check_paths(cfg)


def check_combinations(cfg: Config) -> None:
    if cfg.trainable and cfg.method in TRAINABLE and cfg.trainable != cfg.method:
        raise ConfigError(f"trainable: {cfg.trainable} contradicts method: {cfg.method} (set one of them)")
    if cfg.tuning == "full" and cfg.model.experts == "mxfp4":
        raise ConfigError(
            "full fine-tuning trains the experts, which frozen MXFP4 experts cannot be; "
            "set model.experts: dequantized (or train LoRA adapters)"
        )
    if cfg.model.revision is not None and Path(cfg.model.path).is_absolute():
        raise ConfigError(f"model.revision applies to hub ids; model.path {cfg.model.path!r} is a local directory")
    if cfg.tuning == "full" and cfg.model.adapter:
        raise ConfigError("model.adapter starts LoRA training from an adapter; it needs trainable: lora")
    if cfg.method == "grpo":
        g = cfg.grpo
        if not g.rewards:
            raise ConfigError("method: grpo needs at least one reward function in grpo.rewards")
        if g.reward_weights is not None and len(g.reward_weights) != len(g.rewards):
            raise ConfigError(f"grpo.reward_weights has {len(g.reward_weights)} values for {len(g.rewards)} rewards")
        for key, value, low in (("grpo.num_generations", g.num_generations, 2), ("grpo.max_new_tokens", g.max_new_tokens, 1),
                                ("grpo.max_prompt_len", g.max_prompt_len, 1), ("grpo.log_rollouts", g.log_rollouts, 0)):
            if value < low:
                raise ConfigError(f"{key} must be at least {low}, got {value}")
        if not 0 < g.top_p <= 1 or g.temperature <= 0 or g.beta < 0 or g.clip_eps <= 0:
            raise ConfigError("grpo: temperature and clip_eps must be positive, top_p in (0, 1], beta >= 0")
    want = {"dpo": PAIR_FORMATS, "grpo": PROMPT_FORMATS}.get(cfg.objective, DATA_FORMATS)
    if cfg.data.format != "auto" and cfg.data.format not in want:
        raise ConfigError(f"data.format: {cfg.data.format} rows do not train with method: {cfg.method} "
                          f"(it takes {', '.join(want)} or auto)")
    if cfg.method == "dpo" and cfg.dpo.beta <= 0:
        raise ConfigError(f"dpo.beta must be positive, got {cfg.dpo.beta}")
    if cfg.tuning == "lora" and not cfg.lora.targets:
        raise ConfigError("lora.targets is empty: nothing would be trained")
    if cfg.tuning == "lora" and cfg.lora.dropout > 0 and set(cfg.lora.targets) & {"experts", "router"}:
        raise ConfigError("lora.dropout must be 0 when lora.targets includes experts or router "
                          "(PEFT's target_parameters adapters have no dropout); target attention only to use it")
    if cfg.tuning == "full" and {"adapter"} & set(cfg.export.formats):
        raise ConfigError("export.formats: a full fine-tune has no adapter to export (use merged or mxfp4)")
    offload = cfg.model.offload_experts
    if offload != "auto":
        if offload and (cfg.tuning != "lora" or cfg.model.experts != "mxfp4"):
            raise ConfigError("model.offload_experts keeps frozen MXFP4 experts on the CPU: it needs LoRA "
                              "and model.experts: mxfp4")
        if offload < 0:
            raise ConfigError(f"model.offload_experts must be at least 0 or auto, got {offload}")
    if cfg.model.offload_activations and not cfg.model.gradient_checkpointing:
        raise ConfigError("model.offload_activations keeps the layer inputs that gradient checkpointing saves "
                          "in CPU memory: it needs model.gradient_checkpointing: true")
    chunk = cfg.model.moe_chunk_size
    if chunk is not None and chunk < 1:
        raise ConfigError(f"model.moe_chunk_size must be a positive number of tokens or null, got {chunk}")
    if len(set(cfg.lora.targets)) != len(cfg.lora.targets):
        raise ConfigError(f"lora.targets has duplicates: {list(cfg.lora.targets)}")
    t = cfg.train
    for key, value, low in (("train.batch_size", t.batch_size, 1), ("train.grad_accum", t.grad_accum, 1),
                            ("lora.r", cfg.lora.r, 1), ("data.max_seq_len", cfg.data.max_seq_len, 2),
                            ("train.keep_checkpoints", t.keep_checkpoints, 1), ("train.log_every", t.log_every, 1),
                            ("train.max_bad_steps", t.max_bad_steps, 1)):
        if value < low:
            raise ConfigError(f"{key} must be at least {low}, got {value}")
    for key, value in (("train.max_steps", t.max_steps), ("train.save_every", t.save_every),
                       ("train.eval_every", t.eval_every)):
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be a positive integer or null, got {value}")
    if t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"train.epochs must be positive, got {t.epochs}")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")


def check_paths(cfg: Config) -> None:
    if not Path(cfg.model.path).expanduser().exists() and cfg.model.init_preset is None and _looks_local(cfg.model.path):
        raise ConfigError(f"model.path: no such directory {cfg.model.path!r} (set model.init_preset to build one)")
    for key, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval),
                      ("evaluate.generate", cfg.evaluate.generate)):
        if path is not None and _looks_local(path) and not Path(path).expanduser().exists():
            raise ConfigError(f"{key}: no such file or directory {path!r}")
    if cfg.model.adapter is not None and not (Path(cfg.model.adapter).expanduser() / "adapter_config.json").is_file():
        raise ConfigError(f"model.adapter: {cfg.model.adapter!r} is not an adapter directory (no adapter_config.json)")


def from_dict(d: dict[str, Any], overrides: list[str] = (), *, check_paths: bool = True,
              relative_to: str | Path | None = ".") -> Config:
    """A config from plain data and dotted overrides, validated. relative_to: the directory the
    relative input paths of `d` resolve against (a config file's; default: the current directory);
    None leaves `d`'s paths as they are (a run's recorded config). Overrides resolve against the
    current directory."""
    d = copy.deepcopy(d)
    if relative_to is not None:
        resolve_paths(d, Path(os.path.abspath(relative_to)), check=check_paths)
    for o in overrides:
        apply_override(d, o)
        resolve_paths(d, Path.cwd(), only=o.split("=", 1)[0].strip(), check=False)
    cfg = _build(Config, d)
    check(cfg, paths=check_paths)
    return cfg


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top`'s keys over `base`'s, section by section."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_hardware(d: dict[str, Any], path: Path, overrides: list[str], *, check_paths: bool = True
                  ) -> tuple[dict[str, Any], list[str]]:
    """(config data with its hardware file's keys under its own, the overrides left to apply).

    A recipe says what to train, a hardware file (configs/*.yaml) on which model and machine: the
    config's `hardware: FILE` (relative to the config's directory) or a `hardware=FILE` override
    (relative to the current directory) names it. Its keys come first, the config's replace them,
    and the remaining overrides replace both. The hardware file's own relative paths resolve
    against its directory. A hardware file names no hardware file itself."""
    d = dict(d)
    named = d.pop("hardware", None)
    rest, given = [], None
    for o in overrides:
        key, sep, value = o.partition("=")
        if key.strip() == "hardware" and sep:
            given = value.strip()
        else:
            rest.append(o)
    if given is not None:
        hardware = Path(given).expanduser() if given else None
    elif named is not None:
        if not isinstance(named, str) or not named:
            raise ConfigError(f"{path}: hardware: expected the path of a hardware file (configs/*.yaml), got {named!r}")
        hardware = Path(named).expanduser()
        hardware = hardware if hardware.is_absolute() else path.parent / hardware
    else:
        hardware = None
    if hardware is None:
        return d, rest
    hw = _read_yaml(hardware, f"{path}: hardware: no such hardware file {hardware}")
    if "hardware" in hw:
        raise ConfigError(f"{hardware}: a hardware file names no other hardware file (found hardware: {hw['hardware']!r})")
    resolve_paths(hw, Path(os.path.abspath(hardware.parent)), check=check_paths)
    return _merged(hw, d), rest


def _read_yaml(path: Path, missing: str) -> dict[str, Any]:
    """A config or hardware file's sections; errors name the file (`missing`: the message when it is not there)."""
    try:
        d = yaml.safe_load(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(missing) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return d


def load(path: str | Path, overrides: list[str] = (), *, check_paths: bool = True) -> Config:
    """Read a YAML config (with its hardware file), apply dotted overrides, validate. Errors name the
    file and the key. Relative input paths in a file resolve against its directory (module docstring)."""
    path = Path(path)
    d = _read_yaml(path, f"{path}: no such config file")
    d, overrides = with_hardware(d, path, list(overrides), check_paths=check_paths)
    try:
        return from_dict(d, overrides, check_paths=check_paths, relative_to=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump(cfg: Config) -> str:
    """The config as a run's `config.yaml` holds it; `from_dict(yaml.safe_load(...))` reads it back."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
