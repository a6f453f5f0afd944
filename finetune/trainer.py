"""The training loop: one loop for one CPU to many GPUs, on accelerate.

Batches are a pure function of (seed, epoch, step), so the data position in a checkpoint is just the
step. Each global micro-batch of `batch_size * processes` rows is cut into one slice per process,
so the same global batch gives the same losses on one process or many. The loss is the mean over
every trained token of the optimizer step (all micro-batches, all processes), computed exactly by
counting those tokens first.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import model as modellib
from model.checkpoint import save as save_checkpoint_dir
from model.checkpoint import write_random
from model.config import preset
from model.modeling import MLPBlock

from . import config as cfglib
from .distributed import accelerator as make_accelerator
from .distributed import describe, held_line, held_per_process, is_sharded
from .dpo import DPO
from .evaluate import accuracy, load_probes
from .generate import load_for_inference
from .export import export
from .grpo import GRPO
from .objectives import SFT, Data, Objective, TrainingError, sum_stats
from .plan import auto_offload
from .plot import loss_curve_png
from .run import RunDir, attach_adapter, locate_base, save_adapter
from .state import latest_checkpoint, load_checkpoint, save_checkpoint


# -- setup ---------------------------------------------------------------------------------------------

def _dtype(cfg: cfglib.Config, device: torch.device) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]


def _ensure_base_model(cfg: cfglib.Config, accelerator) -> None:
    """The quickstart's base model is built on the spot when missing (model.init_preset)."""
    if Path(cfg.model.path).exists() or cfg.model.init_preset is None:
        return
    if accelerator.is_main_process:
        write_random(cfg.model.path, preset(cfg.model.init_preset), seed=cfg.model.init_seed)
        accelerator.print(f"built a random {cfg.model.init_preset} base model at {cfg.model.path}")
    accelerator.wait_for_everyone()


def load_model(cfg: cfglib.Config, device: torch.device):
    """The model with exactly the trainable parameters the method asks for."""
    base = locate_base(cfg.model.path, cfg.model.revision)[0]
    m = modellib.from_pretrained(base, dtype=_dtype(cfg, device), experts=cfg.model.experts)
    if cfg.tuning == "lora":
        if cfg.model.adapter:  # continue training an existing adapter (e.g. SFT -> DPO / GRPO)
            s = attach_adapter(m, cfg.model.adapter)
            print(f"model.adapter: {cfg.model.adapter} (r={s.r}, alpha={s.alpha}, targets {list(s.targets)}"
                  f"{', rsLoRA' if s.use_rslora else ''}; the lora section's shape settings are not used)")
        else:
            lc = cfg.lora
            modellib.add_lora(m, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=tuple(lc.targets),
                              use_rslora=lc.use_rslora)
        # Adapters train in fp32 even on a bf16 base: their updates are small relative to the weights.
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if cfg.train.qat:
        modellib.set_qat(m, True)
    if cfg.model.gradient_checkpointing:
        m.gradient_checkpointing_enable(offload_to_cpu=cfg.model.offload_activations)
    m.moe_chunking(cfg.model.moe_chunk_size)
    return m


def lr_lambda(cfg: cfglib.TrainSection, total_steps: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.schedule == "constant":
            decay = 1.0
        elif cfg.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return f


# -- batches: a pure function of (seed, epoch, index) -----------------------------------------------

class Batches:
    """Micro-batches for one process. Global micro-batch g of an epoch covers rows
    order[g*B*W : (g+1)*B*W] of that epoch's seeded permutation, process r takes its r-th slice of B.
    The last global batches of an epoch wrap around to the epoch's first rows (nothing is dropped)."""

    def __init__(self, rows: list, *, batch_size: int, grad_accum: int, world: int, rank: int, seed: int):
        self.rows, self.b, self.a, self.w, self.r, self.seed = rows, batch_size, grad_accum, world, rank, seed
        self.steps_per_epoch = max(1, math.ceil(len(rows) / (batch_size * world * grad_accum)))
        self._order_cache: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._order_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order_cache = {epoch: torch.randperm(len(self.rows), generator=g).tolist()}
        return self._order_cache[epoch]

    def for_step(self, step: int) -> list[list]:
        """The grad_accum micro-batches (lists of rows) this process runs at optimizer step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        n = len(order)
        out = []
        for k in range(self.a):
            g = within * self.a + k
            start = g * self.b * self.w + self.r * self.b
            out.append([self.rows[order[(start + i) % n]] for i in range(self.b)])
        return out

    @property
    def layout(self) -> dict[str, int]:
        """What decides the rows of a step besides the seed; checkpoints keep it, a resume must match it
        (the process count may change when batch_size changes with it)."""
        return {"rows_per_micro_batch": self.b * self.w, "grad_accum": self.a}

    def check_resumable(self, saved: dict, where: Path) -> None:
        old = {k: saved[k] for k in self.layout if k in saved}
        if old and old != self.layout:
            rows = old.get("rows_per_micro_batch", self.b * self.w)
            fix = (f"train.batch_size={rows // self.w}" if rows % self.w == 0
                   else f"a process count that divides {rows}")
            raise TrainingError(
                f"{where} was written with {rows} rows per micro-batch (train.batch_size x processes) and grad_accum "
                f"{old.get('grad_accum', self.a)}; this run has {self.b} x {self.w} = {self.b * self.w} and "
                f"grad_accum {self.a}, so its steps would cover other rows. Resume with {fix} on {self.w} "
                f"process(es) and train.grad_accum={old.get('grad_accum', self.a)}")


# -- the run: setup, loop, finish ---------------------------------------------------------------------

@dataclass
class _Run:
    """Everything the loop and the finish share, built by `_setup`."""

    cfg: cfglib.Config
    dir: RunDir
    accelerator: Accelerator
    objective: Objective
    data: Data
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: dict[str, torch.nn.Parameter]
    """The trainable parameters by name (checkpoints key their state by these names)."""
    batches: Batches
    total: int
    start: int
    logger: _Logger
    probes: list | None
    results: dict
    t_begin: float
    t_start: float
    """perf_counter() at step 0 (earlier by the elapsed time of the steps before a resume)."""
    held: list[dict[str, int]] | None = None
    """Bytes each process holds after the run's first step (`distributed.held_per_process`)."""

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(config: cfglib.Config | str | Path, overrides: list[str] = (), *, resume: bool = False) -> Path:
    """Run the fine-tuning `config` describes (a `Config`, or a YAML path with dotted `overrides`);
    returns the run directory. With `resume`, continue from its newest complete checkpoint."""
    t_begin = time.perf_counter()
    if isinstance(config, cfglib.Config):
        cfg = cfglib.from_dict(config.to_dict(), list(overrides)) if overrides else config
    else:
        cfg = cfglib.load(config, list(overrides))
    precision = _precision(cfg)
    # The engine the launch asked for (FSDP2 also on CPU processes), or an error saying what works.
    accelerator = make_accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
    if accelerator.device.type == "cpu":
        return_freed_memory_to_the_os()
    # Some CPU kernels (index_put with accumulate, in the MoE backward) sum in thread order; the
    # deterministic variants make a resumed run bit-identical to an uninterrupted one.
    with _deterministic_algorithms(accelerator.device.type == "cpu"):
        run = _setup(cfg, accelerator, precision, resume=resume, t_begin=t_begin)
        _loop(run)
        _finish(run)
    path = run.dir.path
    # Sharded tensors and FSDP's state hold the process group: released first, it is destroyed while
    # the interpreter is whole (left to exit, gloo's threads could abort a process whose peer lingers).
    del run
    accelerator.free_memory()
    accelerator.end_training()
    return path


def return_freed_memory_to_the_os() -> None:
    """CPU runs: glibc's malloc serves every allocation of 1 MiB or more by its own mmap, released on free.

    glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB), so after the
    first steps a layer's activations (tensors of a few MiB each) come from the heap, where freed
    blocks are kept and fragment: at 8k tokens (bench_long_context) that held 0.9 GiB more than the
    step's live tensors and made peak RSS grow 2.7x faster with length than they do. A fixed
    threshold keeps RSS at what is alive (what `gptoss-ft plan` counts); the step time did not
    change. No-op where the C library is not glibc (mallopt absent)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed from now on (no dynamic raise)


def _precision(cfg: cfglib.Config) -> str:
    if cfg.train.precision == "auto":
        # bf16 weights need bf16 autocast on CPU too: the fp32 LoRA adapters meet bf16 activations
        return "bf16" if torch.cuda.is_available() or cfg.model.dtype == "bfloat16" else "fp32"
    return cfg.train.precision


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms for the run only: the caller's setting comes back after."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _setup(cfg: cfglib.Config, accelerator: Accelerator, precision: str, *, resume: bool, t_begin: float) -> _Run:
    """Config written, data loaded, model and optimizer prepared, state restored when resuming."""
    accelerator.print(f"{describe(accelerator)}, device {accelerator.device}, precision {precision}")
    if is_sharded(accelerator) and cfg.objective == "grpo":
        raise TrainingError("GRPO with sharded weights (FSDP2, ZeRO-3) is not supported: each process generates "
                            "until its own completions end, and sharding needs every process to run the same "
                            "forward passes. Train GRPO with configs/accelerate/ddp.yaml or on one process")
    set_seed(cfg.train.seed)
    rd = RunDir(cfg.output_dir)
    main = accelerator.is_main_process
    _ensure_base_model(cfg, accelerator)
    # Records config.yaml and the base's fingerprint; resuming, refuses a base other than the run's.
    cfg = rd.start(cfg, resume=resume, write=main)
    if main:
        accelerator.print(cfglib.dump(cfg))
    objective = {"sft": SFT, "dpo": DPO, "grpo": GRPO}[cfg.objective](cfg, accelerator.device)
    data = objective.load(cfg)
    accelerator.print(data.report)
    model = load_model(cfg, accelerator.device)
    _offload(cfg, model, accelerator)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    accelerator.print(f"trainable parameters: {sum(p.numel() for p in params.values()):,} "
                      f"of {sum(p.numel() for p in model.parameters()):,} ({cfg.method}, {cfg.tuning})")
    results: dict = {}
    # DPO and GRPO rows are pairs and prompts; their probes are conversations, read with format auto
    probe_format = cfg.data.format if cfg.objective == "sft" else "auto"
    probes = load_probes(cfg.evaluate.generate, data_format=probe_format, limit=cfg.evaluate.limit) \
        if cfg.evaluate.generate and main else None
    if probes and cfg.evaluate.before_training and not resume:
        results["base"] = _accuracy(model, probes, cfg, "base model")
    t = cfg.train
    # Fused on CUDA: foreach AdamW would allocate a temporary as large as all trainable parameters in
    # its step (1 GiB per 250M: 120b LoRA's 1.07B would not fit the plan); fused has none. On CPU
    # the default single-tensor loop has only per-tensor temporaries.
    optimizer = torch.optim.AdamW(params.values(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay,
                                  fused=True if accelerator.device.type == "cuda" else None)
    if accelerator.distributed_type.value == "DEEPSPEED":
        _deepspeed_setup(model, t, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP2 replaces each parameter by a sharded one (same name): checkpoints use the new ones.
    params = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    objective.prepare(model, data, accelerator, rd)

    batches = Batches(data.train_rows, batch_size=t.batch_size, grad_accum=t.grad_accum,
                      world=accelerator.num_processes, rank=accelerator.process_index, seed=t.seed)
    total = t.max_steps or max(1, math.ceil((t.epochs or 1.0) * batches.steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, total))
    start, elapsed_before = 0, 0.0
    if resume:
        found = latest_checkpoint(rd.checkpoints)
        if found is None:
            accelerator.print(f"--resume: no complete checkpoint in {rd.checkpoints}; starting at step 0")
        else:
            state = load_checkpoint(found, params=params, optimizer=optimizer)
            batches.check_resumable(state, found)
            start, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
            with warnings.catch_warnings():  # stepping the schedule forward before any optimizer step is the point
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(start):
                    scheduler.step()
            accelerator.print(f"resumed from {found} (step {start} of {total})")
    if main:
        for log in (rd.metrics, rd.rollouts):
            _truncate_metrics(log, after_step=start)
    return _Run(cfg, rd, accelerator, objective, data, model, optimizer, scheduler, params, batches, total, start,
                _Logger(cfg, rd, main, total, start), probes, results, t_begin,
                t_start=time.perf_counter() - elapsed_before)


def _loop(run: _Run) -> None:
    """Optimizer steps from `run.start` to `run.total`: step, log, eval, checkpoint."""
    t, acc = run.cfg.train, run.accelerator
    names = {p: n for n, p in run.params.items()}
    bad_in_a_row = 0
    run.model.train()
    for step in range(run.start, run.total):
        t0 = time.perf_counter()
        micro = [run.objective.batch(run.model, rows, step=step, micro=k)
                 for k, rows in enumerate(run.batches.for_step(step))]
        stats, n_input, grad_norm = _step(run.model, micro, run.objective, acc, t)
        loss = stats["loss"]
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        bad_in_a_row = 0 if finite else bad_in_a_row + 1
        if finite:
            run.optimizer.step()
        else:
            warnings.warn(f"step {step + 1}: non-finite loss or gradient ({loss}, {grad_norm}); step skipped")
            if bad_in_a_row >= t.max_bad_steps:
                raise TrainingError(
                    f"{bad_in_a_row} non-finite steps in a row at step {step + 1}; stopping. The last good "
                    f"checkpoint in {run.dir.checkpoints} is intact (lower train.lr or check the data)."
                )
        if step == run.start:  # gradients and optimizer state exist now: what does each process hold?
            run.held = held_per_process(run.model, run.optimizer, acc)
            acc.print(held_line(run.held))
        run.optimizer.zero_grad(set_to_none=True)
        lr = run.scheduler.get_last_lr()[0]
        run.scheduler.step()
        done = step + 1
        if done % t.log_every == 0 or done == run.total:
            run.logger.log({"step": done, **stats, "lr": lr, "grad_norm": grad_norm,
                            "tokens_per_s": n_input / (time.perf_counter() - t0),
                            "elapsed_s": time.perf_counter() - run.t_start,
                            "epoch": done / run.batches.steps_per_epoch, **({} if finite else {"skipped": True})})
            run.objective.after_log(done, run.logger)
        if run.data.eval_rows and t.eval_every and (done % t.eval_every == 0 or done == run.total):
            metrics = evaluate(run.model, run.objective, run.data.eval_rows, acc, t.batch_size)
            run.logger.log({"step": done, **{f"eval_{k}": v for k, v in metrics.items()}})
        due = (t.save_every and done % t.save_every == 0) or done == run.total
        if due and acc.distributed_type.value != "DEEPSPEED":  # ZeRO's optimizer state: see _deepspeed_setup
            acc.wait_for_everyone()
            save_checkpoint(run.dir.checkpoints, done, trainable=run.params, optimizer=run.optimizer,
                            param_names=names, keep=t.keep_checkpoints, extra={
                                "elapsed_s": time.perf_counter() - run.t_start, "total_steps": run.total,
                                **run.batches.layout})
    run.logger.close()


def _finish(run: _Run) -> None:
    """The trained adapter or model, evaluation, exports and the summary."""
    acc, cfg = run.accelerator, run.cfg
    acc.wait_for_everyone()
    state = acc.get_state_dict(run.model)  # whole tensors on the main process (a collective)
    if not run.main:
        return
    tuned = acc.unwrap_model(run.model)
    _save_final(cfg, tuned, state, run.dir)
    train_time = time.perf_counter() - run.t_start
    if run.probes:
        what = "fine-tuned model"
        if is_sharded(acc):  # the live model is sharded and the other processes have left: reload what was written
            tuned = load_for_inference(str(run.dir.path), dtype=_dtype(cfg, acc.device), device=str(acc.device))
            what += f" (reloaded from {run.dir.trained_weights()})"
        run.results["tuned"] = _accuracy(tuned, run.probes, cfg, what)
    for fmt in cfg.export.formats:
        run.results.update(_export_and_measure(cfg, run.dir, fmt, run.probes, acc.device))
    _summarize(run.dir, run.results, train_time=train_time, total_time=time.perf_counter() - run.t_begin,
               held=run.held)


def _offload(cfg: cfglib.Config, model, accelerator) -> None:
    """Frozen weights that stay in CPU memory when the model moves to the GPU (model.offload_*)."""
    m = cfg.model
    if accelerator.device.type == "cpu" or cfg.tuning != "lora":
        return  # nothing to save on a CPU run; full fine-tuning trains the embedding
    if accelerator.num_processes > 1:
        if m.offload_experts not in (0, "auto"):
            raise TrainingError("model.offload_experts works with one process (data parallelism replicates the "
                                "experts on every GPU anyway); shard with FSDP2 instead, or set it to 0")
        accelerator.print("model.offload_*: ignored with several processes")
        return
    n = m.offload_experts
    if n == "auto":
        budget = torch.cuda.get_device_properties(accelerator.device).total_memory / 2 ** 30
        n = auto_offload(cfg, budget, model.config) if m.experts == "mxfp4" else 0
        accelerator.print(f"model.offload_experts: auto -> {n} layer(s) for {budget:.1f} GiB of GPU memory "
                          "(set a number to override)")
    if n > model.config.num_hidden_layers:
        raise TrainingError(f"model.offload_experts: {n} is more than the model's {model.config.num_hidden_layers} layers")
    layers = model.offload(embeddings=m.offload_embeddings, expert_layers=n)
    if m.offload_embeddings or layers:
        accelerator.print(f"kept in CPU memory: {'the input embedding; ' if m.offload_embeddings else ''}"
                          f"the MXFP4 experts of {len(layers)} layer(s) {layers}")


def _deepspeed_setup(model, t: cfglib.TrainSection, accelerator) -> None:
    """ZeRO-3: each MoE block is one leaf (gathered whole, not hooked per expert, since a batch
    touches only some experts). DeepSpeed is told the train section's micro-batch, accumulation and
    clipping (it steps inside the last micro-batch's backward, see `_step`). Mid-run checkpoints
    would need ZeRO's partitioned optimizer state in our format; they are supported on one process,
    DDP and FSDP2 only."""
    from deepspeed.utils import set_z3_leaf_modules  # optional: only DeepSpeed launches get here

    if t.save_every:
        raise TrainingError("train.save_every is not supported with DeepSpeed (use configs/accelerate/fsdp2.yaml "
                            "for resumable sharded runs, or set train.save_every: null)")
    if t.eval_every:  # seen on 2 CPU processes: one finished its held-out batches, the other waited on a gather
        raise TrainingError("train.eval_every is not supported with DeepSpeed: ZeRO-3's forward passes over held-out "
                            "rows hung (the processes stopped gathering the same weights); set train.eval_every: "
                            "null, or shard with configs/accelerate/fsdp2.yaml")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, ours in (("train_micro_batch_size_per_gpu", t.batch_size), ("gradient_accumulation_steps", t.grad_accum),
                      ("gradient_clipping", t.max_grad_norm or 0.0)):
        if ds.get(key, "auto") not in ("auto", ours):
            raise TrainingError(f"the DeepSpeed launch file sets {key}: {ds[key]}, the config's train section "
                                f"{ours}: leave it out of the launch file (the trainer sets it from train.*)")
        ds[key] = ours
    set_z3_leaf_modules(model, [MLPBlock])


def _step(model, micro: list[dict], objective: Objective, accelerator,
          t: cfglib.TrainSection) -> tuple[dict[str, float], int, float]:
    """Forward/backward over the micro-batches of one optimizer step; returns (the objective's
    stats as means, input tokens, grad norm)."""
    # The objective's units (trained tokens, pairs) of the whole step, every process: each
    # micro-batch's summed loss is divided by this, so the step's gradient is the exact mean
    # whatever the split. (x world: DDP averages.)
    counts = accelerator.reduce(torch.tensor([sum(objective.count(b) for b in micro),
                                              sum(int(b["num_tokens"]) for b in micro)],
                                             device=accelerator.device), reduction="sum")
    denom, n_input = max(1, int(counts[0])), int(counts[1])
    stats = []
    # FSDP2 reduce-scatters every micro-batch's gradients: skipping it (no_sync) would keep each
    # unit's whole gradient until the last micro-batch, the memory sharding is there to save.
    sync_each = is_sharded(accelerator)
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    for i, b in enumerate(micro):
        last = i == len(micro) - 1
        ctx = accelerator.no_sync(model) if not last and not sync_each else contextlib.nullcontext()
        with ctx, accelerator.autocast():
            total, s, aux = objective.loss(model, b, aux=t.aux_loss_coef > 0)
            loss = total / denom
            if t.aux_loss_coef > 0:
                loss = loss + t.aux_loss_coef * aux / len(micro)
            if deepspeed:  # the engine (`model`) divides by grad_accum itself and steps at the last micro-batch
                model.set_gradient_accumulation_boundary(last)
                model.backward(loss * accelerator.num_processes * len(micro))
                if last:
                    model.step()
            else:
                accelerator.backward(loss * accelerator.num_processes)
        stats.append(s)
    max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
    grad_norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    return _means(sum_stats(stats), accelerator), n_input, float(grad_norm)


def _means(stats: dict[str, torch.Tensor], accelerator, names=None) -> dict[str, float]:
    """(sum, count) pairs summed over processes, as sum / count. `names`: the keys every process
    reduces (a process without rows has no stats of its own)."""
    names = sorted(names or stats)
    zero = torch.zeros(2, dtype=torch.float64)
    both = accelerator.reduce(torch.stack([stats.get(k, zero) for k in names]).to(accelerator.device),
                              reduction="sum")
    return {k: float(v[0] / v[1].clamp(min=1)) for k, v in zip(names, both)}


@torch.no_grad()
def evaluate(model, objective: Objective, rows: list, accelerator, batch_size: int) -> dict[str, float]:
    """The objective's stats over held-out rows, each process taking every world-th row."""
    model.eval()
    mine = rows[accelerator.process_index::accelerator.num_processes]
    stats = objective.evaluate(model, mine, batch_size) if mine else {}
    if is_sharded(accelerator):  # each forward all-gathers weights: every process runs as many batches as the first
        for _ in range(-(-len(rows[0::accelerator.num_processes]) // batch_size) - -(-len(mine) // batch_size)):
            objective.evaluate(model, rows[:batch_size], batch_size)  # its stats are not this process's rows
    model.train()
    return _means(stats, accelerator, objective.eval_stats)


def _truncate_metrics(path: Path, *, after_step: int) -> None:
    """A resumed run re-runs the steps after its checkpoint: drop their old rows so none is doubled."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in keep))


class _Logger:
    """metrics.jsonl (one object per logged step), wandb when enabled, a progress bar with ETA."""

    def __init__(self, cfg: cfglib.Config, rd: RunDir, main: bool, total: int, start: int):
        self.main = main
        self.path = rd.metrics
        self.wandb = None
        self.progress = None
        if not main:
            return
        if cfg.wandb.enabled:
            import wandb  # optional at import time: only runs that log to it pay for it

            # mode=None leaves WANDB_MODE (or wandb's default) in charge; the environment is never written
            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, dir=str(rd.path),
                                    config=cfg.to_dict(), mode=cfg.wandb.mode)
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), transient=False)
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.progress.start()

    def log(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if "lr" in row:
            self.progress.update(self.task, completed=row["step"],
                                 info=f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s")
        else:
            shown = ", ".join(f"{k.removeprefix('eval_').replace('_', ' ')} {v:.4f}" for k, v in row.items() if k != "step")
            self.progress.console.print(f"step {row['step']}: eval {shown}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.wandb is not None:
            self.wandb.finish()


def _accuracy(model, probes, cfg: cfglib.Config, what: str):
    t0 = time.perf_counter()
    report = accuracy(model, probes, max_new_tokens=cfg.evaluate.max_new_tokens)
    print(f"{what}: exact-match accuracy {report.accuracy:.3f} on {report.n} held-out prompts "
          f"({time.perf_counter() - t0:.0f}s)")
    return report


def _export_and_measure(cfg: cfglib.Config, rd: RunDir, fmt: str, probes, device) -> dict:
    """Write `fmt` into the run's export/ and, for a model export, measure its accuracy."""
    t0 = time.perf_counter()
    report = export(rd.path, fmt, rd.export(fmt))
    print(f"exported {fmt} to {report.path} ({time.perf_counter() - t0:.0f}s)")
    if fmt not in ("merged", "mxfp4") or not probes:
        return {}
    exported = modellib.from_pretrained(report.path, dtype=_dtype(cfg, device), experts="mxfp4", device=device)
    return {fmt: _accuracy(exported, probes, cfg, f"{fmt} export")}


def _summarize(rd: RunDir, results: dict, *, train_time: float, total_time: float, held: list | None = None) -> None:
    """`summary.json`, `loss.png` and a short table: what the run did, in one place."""
    rows = [json.loads(x) for x in rd.metrics.read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    summary = {
        **{f"{k}_accuracy": v.accuracy for k, v in results.items()},
        "first_loss": train[0][1] if train else None,
        "final_loss": train[-1][1] if train else None,
        "final_eval_loss": evals[-1][1] if evals else None,
        "steps": train[-1][0] if train else 0,
        "train_time_s": round(train_time, 1),
        "total_time_s": round(total_time, 1),
        "eval_prompts": next(iter(results.values())).n if results else 0,
        "samples": {k: v.samples for k, v in results.items()},
        "held_bytes_per_process": held,
    }
    rd.summary.write_text(json.dumps(summary, indent=2) + "\n")
    loss_curve_png(rd.loss_plot, train, evals)
    table = Table(title=f"{rd.path}")
    table.add_column("")
    table.add_column("value", justify="right")
    for k, v in results.items():
        table.add_row(f"{k} accuracy", f"{v.accuracy:.3f}")
    for key in ("first_loss", "final_loss", "final_eval_loss"):
        if summary[key] is not None:
            table.add_row(key.replace("_", " "), f"{summary[key]:.4f}")
    table.add_row("train time", f"{train_time:.0f}s")
    table.add_row("total time", f"{total_time:.0f}s")
    Console().print(table)
    print(f"summary: {rd.summary}, loss curve: {rd.loss_plot}")


def _save_final(cfg: cfglib.Config, model, state: dict, rd: RunDir) -> None:
    if cfg.tuning == "lora":
        save_adapter(model, rd.adapter, base_model=cfg.model.path, state_dict=state)
        print(f"adapter written to {rd.adapter}")
    else:
        save_checkpoint_dir(rd.model, model.config, ((n, t.detach()) for n, t in state.items()))
        print(f"model written to {rd.model}")
