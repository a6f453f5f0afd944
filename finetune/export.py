"""`gptoss-ft export`: a run's PEFT adapter, a merged bf16 checkpoint, a merged checkpoint with its
experts requantized to MXFP4, or that model as one GGUF file (`finetune.gguf`).

The model formats write `finetune.merge.merged_tensors` (streamed one layer at a time; changed
experts requantized there) through a `CheckpointWriter`, in HF's or OpenAI's original layout, with
the base's tokenizer and generation files beside them. The adapter format copies the run's adapter
and adds a README on how to serve it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from model.checkpoint import DEFAULT_SHARD_BYTES, LAYOUTS, CheckpointWriter, atomic_directory
from model.config import MXFP4_QUANTIZATION_CONFIG

from .gguf import export_gguf
from .merge import ExportReport, merged_tensors
from .run import ExportError, Run, RunDir, open_run

FORMATS = ("adapter", "merged", "mxfp4", "gguf")
"""What `gptoss-ft export --format` and the config's `export.formats` write."""
REQUANT = ("gptq", "nearest")
"""How changed experts are rounded back to MXFP4: error-aware GPTQ, or plain round to nearest."""
# Files of an HF release that are not weights; copied so the export runs as the base does.
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "generation_config.json")


def export(run_dir, fmt: str, out, *, base: str | None = None, layout: str = "hf", requant: str = "gptq",
           calib_tokens: int = 2048, calib_data: str | None = None,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress=None) -> ExportReport:
    """Write `fmt` (one of FORMATS) for the run in `run_dir` to `out`: a directory, or for "gguf" a
    FILE.gguf with an Ollama Modelfile beside it (`run_dir` may then also be a checkpoint).

    base: the base checkpoint when not the run's `model.path`. layout: "hf" or "original" (OpenAI's,
    MXFP4 experts only). requant: "gptq" (error-aware, the default) or "nearest" (plain round to
    nearest, for comparison). calib_tokens / calib_data: how many training tokens, from which file
    (default: the run's `data.train`), GPTQ sees. progress: called with a line per finished layer.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if requant not in REQUANT:
        raise ExportError(f"unknown requantization {requant!r}; choose from {', '.join(REQUANT)}")
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    out = Path(out)
    if fmt == "gguf":
        if layout != "hf":
            raise ExportError("--layout applies to checkpoint exports, not to GGUF")
        return export_gguf(run_dir, out, base=base, requant=requant, calib_tokens=calib_tokens, calib_data=calib_data,
                           progress=progress)
    run = open_run(run_dir, base)
    if fmt == "adapter":
        if layout != "hf":
            raise ExportError("--layout applies to model exports, not to adapters")
        return _export_adapter(run, out, base)
    if fmt == "merged" and layout == "original":
        raise ExportError("OpenAI's original layout stores experts in MXFP4 only; use --format mxfp4 for it")
    report = ExportReport(out, fmt)
    cfg = run.config.replace(quantization_config=dict(MXFP4_QUANTIZATION_CONFIG) if fmt == "mxfp4" else None)
    with CheckpointWriter(out, cfg, layout=layout, max_shard_bytes=max_shard_bytes) as writer:
        for name, tensor in merged_tensors(run, fmt, report, requant=requant, calib_tokens=calib_tokens,
                                           calib_data=calib_data, progress=progress):
            writer.add(name, tensor)
        if layout == "hf":
            for fname in _SIDE_FILES:
                if (run.base.path / fname).is_file():
                    shutil.copy(run.base.path / fname, writer.tmp / fname)
        writer.close()
    return report


def _export_adapter(run: Run, out: Path, base: str | None) -> ExportReport:
    if run.adapter is None:
        raise ExportError(f"{run.path} is a full fine-tuning run: it has no adapter (export merged or mxfp4)")
    with atomic_directory(out) as tmp:
        for f in RunDir(run.path).adapter.iterdir():
            shutil.copy(f, tmp / f.name)
        acfg = json.loads((tmp / "adapter_config.json").read_text())
        if base is not None:
            acfg["base_model_name_or_path"] = str(Path(base).resolve()) if Path(base).exists() else base
            (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n")
        (tmp / "README.md").write_text(adapter_readme(acfg, out))
    return ExportReport(out, "adapter")


def adapter_readme(acfg: dict, out: Path) -> str:
    """How to use the adapter: transformers + PEFT, and vLLM."""
    base = acfg.get("base_model_name_or_path") or "openai/gpt-oss-20b"
    r = acfg["r"]
    experts = any("experts" in p for p in acfg.get("target_parameters") or [])
    router = any("router" in p for p in acfg.get("target_parameters") or [])
    lines = [
        "# gpt-oss LoRA adapter (gptoss-ft)",
        "",
        f"Base model: `{base}`. Rank {r}, alpha {acfg['lora_alpha']}; attention modules: "
        f"{', '.join(acfg.get('target_modules') or []) or 'none'}; parameters: "
        f"{', '.join(acfg.get('target_parameters') or []) or 'none'}.",
        "",
        "Expert LoRA uses PEFT's `target_parameters` layout for the 3-D expert tensors: per layer,",
        "`mlp.experts.base_layer.lora_A/B` adapt `gate_up_proj` and `mlp.experts.lora_A/B` adapt `down_proj`;",
        "`lora_A` is `[r*E, in]` (expert e = rows e*r .. e*r+r-1), `lora_B` is `[out, r*E]` (expert e = columns",
        "j*E + e). This is the layout PEFT writes for transformers' GptOss and the one vLLM reads.",
        "",
        "## transformers + PEFT",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from peft import PeftModel",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto", device_map="auto")',
        f'model = PeftModel.from_pretrained(base, "{out}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        "```",
        "",
        "## vLLM",
        "",
        "```bash",
        f"vllm serve {base} --enable-lora --max-lora-rank {max(r, 8)} --lora-modules tuned={out}",
        "```",
        "",
        "Then request `\"model\": \"tuned\"`. "
        + ("Expert LoRA needs a vLLM whose gpt-oss model loads 3-D MoE adapters (`is_3d_moe_weight`); "
           "with an older one, serve the merged export instead. " if experts else "")
        + ("vLLM does not adapt the router; for a router adapter serve `gptoss-ft export --format merged` "
           "or `--format mxfp4` instead. " if router else ""),
        "",
        "Or fold it in: `gptoss-ft export RUN_DIR --format merged|mxfp4 --out DIR`.",
        "",
    ]
    return "\n".join(lines)
