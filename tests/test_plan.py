"""`gptoss-ft plan`: the CPU prediction against the measured peak RSS of real training runs, the
terms that must scale as documented, and the CLI."""

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune import config as cfglib
from finetune import plan as planlib
from finetune.cli import main as cli
from model.checkpoint import write_random
from model.config import GptOssConfig, preset
from model.lora import TARGETS, add_lora
from model.modeling import GptOssForCausalLM

ROOT = Path(__file__).resolve().parents[1]

_MEASURE = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _data(path: Path, rows: int) -> None:
    """Long completions after short prompts: most tokens are trained, so every micro-batch has more
    than one logits chunk of targets and the loss term is the one the plan assumes."""
    rng = random.Random(0)
    words = "the of weather Paris tool because therefore result 42 model train memory plan".split()
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": " ".join(rng.choices(words, k=8)),
                                "completion": " ".join(rng.choices(words, k=400))}) + "\n")


def _measured_peak(tmp: Path, name: str, base: Path, *, seq_len: int, batch: int, ckpt: bool) -> int:
    data = tmp / "data.jsonl"
    if not data.exists():
        _data(data, 40)
    cfg = {"model": {"path": str(base), "experts": "mxfp4", "gradient_checkpointing": ckpt},
           "data": {"train": str(data), "format": "prompt_completion", "max_seq_len": seq_len, "packing": True},
           "method": "lora", "lora": {"r": 16, "alpha": 32, "targets": ["attention", "experts"]},
           "train": {"max_steps": 3, "batch_size": batch, "lr": 1e-4}, "output_dir": str(tmp / name)}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "finetune.cli", "train", str(path)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


CASES = {
    # tiny preset (H=64, 2 layers, 8 experts), no checkpointing
    "tiny": (lambda: preset("tiny"), dict(seq_len=512, batch=4, ckpt=False)),
    # wider and deeper, more experts, gradient checkpointing, another batch shape
    "wide": (lambda: GptOssConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=16,
                                  num_experts_per_tok=4, sliding_window=64,
                                  quantization_config=preset("tiny").quantization_config),
             dict(seq_len=1024, batch=2, ckpt=True)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_prediction_is_within_20_percent_of_a_real_run(tmp_path, case):
    make_config, run = CASES[case]
    base = write_random(tmp_path / "base", make_config(), seed=0)
    measured = _measured_peak(tmp_path, case, base, seq_len=run["seq_len"], batch=run["batch"], ckpt=run["ckpt"])
    predicted = planlib.plan(str(base), method="lora", seq_len=run["seq_len"], batch_size=run["batch"],
                             device="cpu", gradient_checkpointing=run["ckpt"]).peak_bytes
    print(f"{case}: predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, "
          f"error {predicted / measured - 1:+.1%}")
    assert abs(predicted / measured - 1) <= 0.20, (predicted, measured)


def test_terms_scale_as_documented():
    base = planlib.plan("gpt-oss-20b", seq_len=2048)
    two = planlib.plan("gpt-oss-20b", seq_len=2048, gpus=2)
    gb = base.breakdown
    # LoRA r=16 on attention and experts of gpt-oss-20b: exact count from the shapes in docs/ARCHITECTURE.md §4
    per_layer = 16 * ((2880 + 4096) * 2 + (2880 + 512) * 2) + 16 * 32 * (2880 + 5760) + 16 * 32 * (2880 + 2880)
    assert gb["trainable: LoRA adapters (fp32)"] == 24 * per_layer * 4
    assert gb["optimizer: AdamW m and v"] == 2 * gb["gradients"] == 2 * gb["trainable: LoRA adapters (fp32)"]
    # MXFP4 experts are buffers: FSDP does not shard them; adapters, grads and optimizer state it does
    key = "weights: experts MXFP4 blocks + scales (uint8), 24 of 24 layers"
    assert two.breakdown[key] == gb[key] == 24 * 32 * 3 * 2880 * 2880 * 17 // 32
    assert two.breakdown["gradients"] == gb["gradients"] // 2
    ckpt = planlib.plan("gpt-oss-20b", seq_len=2048, gradient_checkpointing=True).breakdown
    kept = ckpt["activations: checkpointed layer inputs (24 layers)"] + ckpt["activations: one layer recomputed in backward, still held"]
    assert kept < gb["activations"] / 5
    full = planlib.plan("gpt-oss-20b", method="full", seq_len=2048, gpus=8)
    # FSDP2 under bf16 trains fp32 masters (accelerate upcasts them): 4 bytes a weight, sharded 8 ways
    assert full.breakdown["weights: experts dense (fp32 masters, trained)"] == 24 * 32 * 3 * 2880 * 2880 * 4 // 8
    assert "weights: experts dense (model dtype, trained)" in planlib.plan("gpt-oss-20b", method="full").breakdown
    assert full.peak_bytes > base.peak_bytes


def test_offloading_terms():
    """model.offload_embeddings takes the input table off the GPU (one process, LoRA); each offloaded
    layer takes exactly its experts' MXFP4 bytes off."""
    on = planlib.plan("gpt-oss-20b", offload_embeddings=False)
    off = planlib.plan("gpt-oss-20b")
    dense_on = on.breakdown["weights: attention, router, norms, lm_head, embeddings (model dtype)"]
    assert dense_on - off.breakdown["weights: attention, router, norms, lm_head (model dtype)"] == 201088 * 2880 * 2
    two = planlib.plan("gpt-oss-20b", gpus=2)  # several processes: the trainer keeps the table on the GPUs
    assert "weights: attention, router, norms, lm_head, embeddings (model dtype)" in two.breakdown
    eight = planlib.plan("gpt-oss-20b", offload_experts=8)
    assert eight.breakdown["weights: experts MXFP4 blocks + scales (uint8), 16 of 24 layers"] == \
        16 * 32 * 3 * 2880 * 2880 * 17 // 32
    assert off.peak_bytes - eight.peak_bytes == 8 * 32 * 3 * 2880 * 2880 * 17 // 32
    with pytest.raises(ValueError, match="one GPU"):
        planlib.plan("gpt-oss-20b", gpus=2, offload_experts=1)
    with pytest.raises(ValueError, match="between 0 and 24"):
        planlib.plan("gpt-oss-20b", offload_experts=25)


def test_fit_offloads_the_fewest_layers():
    p = planlib.fit(14, "gpt-oss-20b", gradient_checkpointing=True)
    assert p.peak_bytes <= 14 * 2**30
    worse = planlib.plan("gpt-oss-20b", gradient_checkpointing=True, offload_experts=p.offload_experts - 1)
    assert worse.peak_bytes > 14 * 2**30
    assert planlib.fit(2, "gpt-oss-20b") is None  # the dense weights alone are more


RECIPE = ROOT / "recipes" / "multilingual-thinking.yaml"
ON_120B = f"hardware={ROOT / 'configs' / 'gpt-oss-120b.yaml'}"


def recipe_on(hardware_overrides):
    return cfglib.load(RECIPE, hardware_overrides, check_paths=False)


@pytest.mark.parametrize("overrides, budget", [([], 14), ([ON_120B], 75)])
def test_shipped_recipes_fit_their_gpu(overrides, budget):
    """The design goal (issue 7): 20b LoRA in 14 GiB, 120b LoRA in 75 GiB (one 80 GB GPU), at sequence
    2048 and batch 1, as the shipped recipe runs on the 20b and 120b hardware files."""
    path = recipe_on(overrides)
    kw = planlib.config_kwargs(path)
    assert kw["seq_len"] == 2048 and kw["batch_size"] == 1 and kw["method"] == "lora"
    assert kw["offload_experts"] == "auto" and kw["gradient_checkpointing"]
    n = planlib.auto_offload(path, budget)  # what the trainer offloads on a GPU of `budget` GiB
    kw.pop("offload_experts")
    assert 0 < n < planlib.load_config(kw["model"]).num_hidden_layers  # some layers, not all
    assert planlib.plan(**kw, offload_experts=n).peak_bytes <= budget * 2**30
    assert planlib.plan(**kw, offload_experts=n - 1).peak_bytes > budget * 2**30
    assert planlib.auto_offload(path, 200) == 0  # a GPU large enough offloads nothing


def test_lora_targets_decide_the_trainable_terms():
    """Attention-only LoRA on 120b drops exactly the expert adapters: their fp32 values, gradients
    and AdamW's m and v (4 + 4 + 8 bytes each)."""
    both = planlib.plan("gpt-oss-120b", seq_len=2048, batch_size=1)
    attention = planlib.plan("gpt-oss-120b", seq_len=2048, batch_size=1, lora_targets=("attention",))
    # per layer (model/lora.py): gate_up A [r*E, H], B [2I, r*E]; down A [r*E, I], B [H, r*E]
    expert_adapters = 36 * 16 * 128 * ((2880 + 2 * 2880) + (2880 + 2880))

    def state(p):  # weights, adapters, gradients, optimizer: what does not depend on the tokens
        return sum(v for k, v in p.breakdown.items() if not k.startswith(("activation", "loss", "logits")))

    assert state(both) - state(attention) == expert_adapters * (4 + 4 + 8)
    assert both.peak_bytes - attention.peak_bytes > expert_adapters * (4 + 4 + 8)  # + trained experts' inputs

    def lora_note(p):
        return next(n for n in p.notes if n.startswith("LoRA"))

    assert lora_note(attention).startswith("LoRA r=16 on attention (q, k, v, o): ")
    every = planlib.plan("gpt-oss-120b", lora_targets=("router", "experts", "attention"))
    assert "on attention (q, k, v, o), every expert (gate_up, down) and the router:" in lora_note(every)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        planlib.plan("gpt-oss-120b", lora_targets=("mlp",))
    with pytest.raises(ValueError, match="at least one target"):
        planlib.plan("gpt-oss-120b", lora_targets=())


def test_attention_only_recipe_offloads_no_experts():
    """Without expert adapters the 120b recipe fits one 80 GB GPU with every expert on it."""
    cfg = cfglib.load(RECIPE, [ON_120B, "lora.targets=[attention]"], check_paths=False)
    kw = planlib.config_kwargs(cfg)
    assert kw["lora_targets"] == ("attention",)
    kw.pop("offload_experts")
    assert planlib.fit(75, **kw).offload_experts == 0
    assert planlib.auto_offload(cfg, 75) == 0  # what the trainer does with `offload_experts: auto`


@pytest.mark.parametrize("targets", [t for k in range(1, len(TARGETS) + 1) for t in itertools.combinations(TARGETS, k)])
def test_lora_counts_equal_a_real_model(targets):
    """On CPU (fp32, one process) the weight, MXFP4 and adapter terms are the real tiny model's
    parameters and buffers, 4 bytes a value."""
    m = GptOssForCausalLM(preset("tiny"), experts="mxfp4")
    dense = sum(p.numel() for p in m.parameters())
    mxfp4 = sum(b.numel() * b.element_size() for b in m.buffers())
    add_lora(m, r=8, alpha=16, targets=targets)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    b = planlib.plan("tiny", device="cpu", lora_r=8, lora_targets=targets).breakdown
    assert b["trainable: LoRA adapters (fp32)"] == trainable * 4
    assert b["weights: attention, router, norms, lm_head, embeddings (model dtype)"] == dense * 4
    assert b["weights: experts MXFP4 blocks + scales (uint8), 2 of 2 layers"] == mxfp4


def test_full_counts_equal_a_real_model():
    m = GptOssForCausalLM(preset("tiny"), experts="dequantized")
    b = planlib.plan("tiny", method="full", device="cpu").breakdown
    assert b["gradients"] == sum(p.numel() for p in m.parameters()) * 4


def test_cli_json_and_table(capsys):
    assert cli(["plan", "--model", "gpt-oss-120b", "--method", "lora", "--seq-len", "2048", "--batch-size", "1",
                "--gpus", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_gib"] == pytest.approx(sum(out["breakdown"].values()), abs=0.01)
    assert out["peak_gib"] == round(planlib.plan("gpt-oss-120b").peak_bytes / 2**30, 3)
    assert cli(["plan", "--model", "gpt-oss-20b", "--method", "full", "--gpus", "8", "--gradient-checkpointing"]) == 0
    assert "peak" in capsys.readouterr().out
    assert cli(["plan", "--model", "no-such-model"]) == 2
    assert cli(["plan"]) == 2  # neither a model nor a config: an error line, not a traceback
    assert cli(["plan", "--model", "gpt-oss-20b", "--gpus", "2", "--offload-experts", "3"]) == 2
    assert "one GPU" in capsys.readouterr().err
    assert cli(["plan", "--config", str(RECIPE), "--fit", "14", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "openai/gpt-oss-20b" and out["offload_experts"] > 0 and out["peak_gib"] <= 14
    assert cli(["plan", "--config", str(RECIPE), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # auto without a GPU size: nothing offloaded, and said so
    assert out["offload_experts"] == 0 and any("auto" in note for note in out["notes"])
    assert cli(["plan", "--model", "gpt-oss-20b", "--gradient-checkpointing", "--fit", "14", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_gib"] <= 14


def test_cli_plans_a_config_with_overrides(capsys):
    """`gptoss-ft plan --config FILE key=value`: the overrides `gptoss-ft train` would take."""
    recipe = str(RECIPE)
    peaks = {}
    for targets in ("[attention, experts]", "[attention]"):
        assert cli(["plan", "--config", recipe, ON_120B, f"lora.targets={targets}", "--fit", "75", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        peaks[targets] = out["peak_gib"], out["offload_experts"]
    assert peaks["[attention, experts]"][1] > 0 and peaks["[attention]"][1] == 0  # offloaded layers
    assert cli(["plan", "--config", recipe, ON_120B, "lora.targets=[attention]", "--json"]) == 0
    lower = json.loads(capsys.readouterr().out)["peak_gib"]
    assert cli(["plan", "--config", recipe, ON_120B, "--json"]) == 0
    assert lower < json.loads(capsys.readouterr().out)["peak_gib"] - 15  # the expert adapters' 15.8 GiB
    assert cli(["plan", "--model", "gpt-oss-20b", "lora.r=8"]) == 2  # overrides need a config
    assert "--config" in capsys.readouterr().err


def test_model_dtype_halves_the_model_dtype_terms_on_cpu():
    """model.dtype: bfloat16 on CPU (what fits the full-size 20b in 24 GiB) stores the dense weights in
    2 bytes; the LoRA adapters and their optimizer stay fp32."""
    fp32 = planlib.plan("gpt-oss-20b", device="cpu", seq_len=512, gradient_checkpointing=True).breakdown
    bf16 = planlib.plan("gpt-oss-20b", device="cpu", seq_len=512, gradient_checkpointing=True, dtype="bfloat16").breakdown
    dense = "weights: attention, router, norms, lm_head, embeddings (model dtype)"
    assert bf16[dense] * 2 == fp32[dense]
    assert bf16["trainable: LoRA adapters (fp32)"] == fp32["trainable: LoRA adapters (fp32)"]
    assert planlib.plan("gpt-oss-20b", dtype="float32", offload_embeddings=False).breakdown[dense] == fp32[dense]
    with pytest.raises(planlib.PlanError, match="dtype must be one of"):
        planlib.plan("gpt-oss-20b", dtype="fp8")
