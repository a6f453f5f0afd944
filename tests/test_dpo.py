"""method: dpo end to end on a tiny model: it learns a preference (held-out reward accuracy), the adapter
it writes prefers chosen answers in transformers + PEFT, a killed run resumes bit-identically, and bad
input stops with a named error. TRL's formulas are checked in test_dpo_trl.py."""

import json
import math

import pytest
import torch
import yaml

import data as datalib
from finetune import config as cfglib
from finetune.cli import main
from finetune.dpo import dpo_loss
from finetune.run import RunDir
from finetune.trainer import train

from test_train import ROOT

PAIRS = (ROOT / "recipes" / "data" / "quickstart_pairs_train.jsonl", ROOT / "recipes" / "data" / "quickstart_pairs_eval.jsonl")


@pytest.fixture(scope="module")
def pairs():
    """The quickstart task as preference pairs (recipes/quickstart_data.py): the same reasoning,
    then the right sound (chosen) or the next animal's (rejected)."""
    return PAIRS


def _config(tmp_path, base, pairs, **over):
    """recipes/quickstart-dpo.yaml (the README's DPO example) on the test's checkpoint and data."""
    d = yaml.safe_load((ROOT / "recipes" / "quickstart-dpo.yaml").read_text())
    d.pop("hardware")  # the test's checkpoint replaces the tiny-cpu hardware file
    d["model"] = {"path": str(base)}
    d["data"].update(train=str(pairs[0]), eval=str(pairs[1]))
    d["output_dir"] = str(tmp_path / "run")
    d["train"].update(eval_every=15)
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return cfglib.from_dict(d)


def test_dpo_learns_the_preference_and_peft_prefers_chosen(tmp_path, tiny_hf, pairs):
    from peft import PeftModel
    from transformers import GptOssForCausalLM, Mxfp4Config

    run = RunDir(train(_config(tmp_path, tiny_hf, pairs)))
    rows = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    first = rows[0]
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-6)  # fresh adapter = reference: every margin 0
    assert first["reward_margin"] == 0 and first["reward_accuracy"] == 0
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= set(first)
    evals = [r for r in rows if "eval_reward_accuracy" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["eval_reward_accuracy"] >= 0.9, evals  # measured: 1.0 (0.95 at step 20)
    assert (run.path / "reference_logps.safetensors").is_file()
    # exports work as for SFT; GPTQ calibrates on the chosen side of the training pairs
    from finetune.export import export

    report = export(run.path, "mxfp4", tmp_path / "mxfp4", calib_tokens=256)
    assert report.calibration_tokens == 256 and report.experts_requantized > 0

    # transformers + PEFT with the adapter written: chosen more likely than rejected on held-out pairs
    held, _ = datalib.load_pairs(pairs[1], max_seq_len=256)
    base = GptOssForCausalLM.from_pretrained(tiny_hf, quantization_config=Mxfp4Config(dequantize=True),
                                             dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(run.adapter)).eval()

    def logp(m, ex):
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(m(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        return float(lp[torch.tensor(ex.loss_mask[1:]).bool()].sum())

    tuned_lp = [(logp(tuned, p.chosen), logp(tuned, p.rejected)) for p in held]
    with tuned.disable_adapter():
        base_lp = [(logp(tuned, p.chosen), logp(tuned, p.rejected)) for p in held]
    # DPO's preference: chosen gained more log-probability than rejected relative to the reference
    # (here the base), i.e. the implicit reward of chosen is higher
    prefers = [(tc - bc) > (tr - br) for (tc, tr), (bc, br) in zip(tuned_lp, base_lp)]
    assert sum(prefers) >= 0.9 * len(held), sum(prefers)
    # and in plain likelihood, chosen is now more often the likelier answer than under the base
    assert sum(tc > tr for tc, tr in tuned_lp) > sum(bc > br for bc, br in base_lp) + 0.2 * len(held)


def test_dpo_loss_formulas():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -4.5]), torch.tensor([-3.5, -4.5])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(chosen, torch.tensor([0.25, -0.25]))
    torch.testing.assert_close(rejected, torch.tensor([-0.25, 0.25]))
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(torch.tensor([0.5, -0.5])))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss="ipo", chosen_tokens=torch.tensor([2, 1]),
                         rejected_tokens=torch.tensor([1, 1]))
    torch.testing.assert_close(ipo, torch.tensor([(0.25 + 0.5 - 1.0) ** 2, (-0.5 - 0.5 - 1.0) ** 2]))
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(pc, pr, rc, rr, beta=0.5, loss="ipo")


def test_killed_dpo_run_resumes_bit_identical(tmp_path, tiny_hf, pairs):
    from resume_check import killed_and_resumed_equal_uninterrupted

    short = {"train": {"max_steps": 6, "save_every": 2, "eval_every": 3, "batch_size": 4}}
    paths = []
    for name in ("whole", "killed"):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(_config(tmp_path / name, tiny_hf, pairs, **short).to_dict()))
        paths.append(cfg)
    rows = killed_and_resumed_equal_uninterrupted(paths[0], paths[1], tmp_path / "killed" / "run", "step-2")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_bad_preference_rows_and_configs_are_named(tmp_path, tiny_hf, pairs, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = pairs[0].read_text().splitlines()[:3]
    broken = json.loads(rows[1])
    del broken["rejected"]
    bad.write_text("\n".join([rows[0], json.dumps(broken), rows[2]]) + "\n")
    cfg = tmp_path / "cfg.yaml"
    d = _config(tmp_path, tiny_hf, pairs).to_dict()
    d["data"]["train"] = str(bad)
    cfg.write_text(yaml.safe_dump(d))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "rejected" in err
    assert main(["train", str(cfg), "data.format=messages"]) == 2
    assert "do not train with method: dpo" in capsys.readouterr().err
    assert main(["train", str(cfg), "dpo.beta=0"]) == 2
    assert "dpo.beta" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_dpo_losses_of_one(tmp_path, tiny_hf, pairs):
    """DDP over gloo: 2 processes of 2 pairs give the losses and rewards of 1 process of 4 pairs
    (the reference log-probs are computed by both processes, each its half, and gathered)."""
    import subprocess
    import sys

    logs = {}
    for name, batch in (("one", 4), ("two", 2)):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(_config(tmp_path / name, tiny_hf, pairs, train={
            "max_steps": 3, "batch_size": batch, "eval_every": None, "save_every": None}).to_dict()))
        cmd = [sys.executable, "-m", "finetune.cli", "train", str(cfg)]
        if name == "two":
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                   "--mixed_precision", "no", *cmd[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = [json.loads(x) for x in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
    # Losses to float reduction order (1e-4 relative, as the SFT check); rewards are beta x differences
    # of summed log-probs of ~100 tokens computed in batches of other shapes: 1e-3 absolute. Steps 2
    # and 3 use the reference log-probs each process computed for its half. (No eval after the last
    # step: Adam turns float noise in near-zero gradients into lr-sized steps, so the final weights
    # agree less closely than the losses along the way.)
    # The single rewards are not compared: after an update, that noise moves chosen and rejected
    # log-probs together by ~1e-2 (their margin, which the loss sees, by far less).
    tolerance = {"loss": lambda v: 1e-4 * max(1.0, abs(v)), "reward_margin": lambda v: 1e-3,
                 "reward_accuracy": lambda v: 0.0}
    for a, b in zip(logs["one"], logs["two"], strict=True):
        for k, tol in tolerance.items():
            if k in a:
                assert abs(a[k] - b[k]) <= tol(a[k]), (k, a, b)


def test_saved_reference_is_reused_only_for_the_same_pairs_and_reference(tmp_path, tiny_hf, pairs, capsys):
    from accelerate import Accelerator

    from finetune.dpo import DPO
    from finetune.trainer import load_model

    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(pairs[0].read_text().splitlines()[:4]) + "\n")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    acc = Accelerator(cpu=True)

    def prepared(**over):
        cfg = _config(tmp_path, tiny_hf, (few, few), data={"eval": None}, **over)
        dpo = DPO(cfg, torch.device("cpu"))
        dpo.prepare(load_model(cfg, torch.device("cpu")), dpo.load(cfg), acc, run)
        return dpo.reference["train"]

    first = prepared()
    assert torch.equal(prepared(), first) and "recomputing" not in capsys.readouterr().out  # read back
    few.write_text("\n".join(pairs[0].read_text().splitlines()[4:8]) + "\n")  # other pairs, same count
    other = prepared()
    assert "recomputing" in capsys.readouterr().out and not torch.equal(other, first)
