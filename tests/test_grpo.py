"""method: grpo on a tiny model: reward functions (built-in and module:function) are called as
documented and checked; a short run logs what it should and writes rollouts; a killed run resumes
bit-identically (rollout sampling included); the README's quickstart-grpo config runs; and (slow)
GRPO from a weak SFT adapter raises greedy accuracy by at least 0.3."""

import json

import pytest
import torch
import yaml

from finetune import config as cfglib
from finetune.grpo import GRPO
from finetune.objectives import TrainingError
from finetune.rewards import Completion, exact_match, format_reward, load_reward, numeric_match, score
from finetune.run import RunDir
from finetune.trainer import train

from test_train import ROOT

PROMPTS = (ROOT / "recipes" / "data" / "quickstart_prompts_train.jsonl",
           ROOT / "recipes" / "data" / "quickstart_prompts_eval.jsonl")

# A user's reward module: keyword arguments as documented, one float per completion.
USER_REWARDS = '''
def answer_and_first_token(completions, prompts, answer, **columns):
    assert len(prompts) == len(completions) == len(answer)
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)  # the row's prompt as given
    # the right answer, plus something a random model's samples differ in: their first token
    return [float(c == a) + (c.tokens[0] % 10) / 10 for c, a in zip(completions, answer)]


def wrong_length(completions, **_):
    return [0.0]


def not_a_number(completions, **_):
    return ["high"] * len(completions)
'''


def _completion(text: str) -> Completion:
    from data.tokenizer import get_tokenizer

    return Completion.from_tokens(get_tokenizer().encode(text, allowed_special="all"))


def test_completion_and_builtin_rewards():
    good = _completion("<|channel|>analysis<|message|>6 times 7.<|end|><|start|>assistant<|channel|>final"
                       "<|message|>It is 42.<|return|>")
    cut = _completion("<|channel|>final<|message|>42")
    assert good == "It is 42." and isinstance(good, str) and good.analysis == "6 times 7." and good.finished
    assert cut == "42" and not cut.finished and cut.analysis == ""
    answers = ["Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 42", "#### 1,000"]
    assert numeric_match([good, _completion("<|channel|>final<|message|>about 1000<|return|>")], None,
                         answer=answers) == [1.0, 1.0]
    assert numeric_match([cut], None, answer=["#### 41"]) == [0.0]
    assert exact_match([cut, good], None, answer=["42", "42"]) == [1.0, 0.0]
    assert format_reward([good, cut], None) == [1.0, 0.0]


def test_reward_loading_and_checks_name_the_function(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    fn = load_reward(f"{path}:answer_and_first_token")
    c = [_completion("<|channel|>final<|message|>moo<|return|>")]
    prompt = [[{"role": "user", "content": "cow?"}]]
    assert score({"mine": fn}, c, prompt, {"answer": ["moo"]}, ["row 0"]) == [[1.0 + (c[0].tokens[0] % 10) / 10]]
    with pytest.raises(TrainingError, match="cannot import 'no_such_module'"):
        load_reward("no_such_module:f")
    with pytest.raises(TrainingError, match="has no function 'nope'"):
        load_reward(f"{path}:nope")
    with pytest.raises(TrainingError, match="neither a built-in"):
        load_reward("exact")
    with pytest.raises(TrainingError, match="wrong_length returned 1 values for 2 completions"):
        score({"wrong_length": load_reward(f"{path}:wrong_length")}, c * 2, prompt * 2, {}, ["row 0", "row 0"])
    with pytest.raises(TrainingError, match="not_a_number returned 'high' for completion 0 of row 3"):
        score({"not_a_number": load_reward(f"{path}:not_a_number")}, c, prompt, {}, ["row 3"])
    with pytest.raises(TrainingError, match="column 'answer'"):
        score({"exact_match": exact_match}, c, prompt, {}, ["row 0"])


def _config(tmp_path, base, rewards, **over) -> cfglib.Config:
    """recipes/quickstart-grpo.yaml (the README's GRPO example) on the test's checkpoint, short."""
    d = yaml.safe_load((ROOT / "recipes" / "quickstart-grpo.yaml").read_text())
    d.pop("hardware")  # the test's checkpoint replaces the tiny-cpu hardware file
    d["model"] = {"path": str(base)}  # fresh adapters: the rewards below vary even for a random model
    d["data"].update(train=str(PROMPTS[0]), eval=str(PROMPTS[1]))
    d["grpo"].update(rewards=rewards, num_generations=4, max_new_tokens=8, log_rollouts=2)
    d["train"].update(max_steps=4, batch_size=2, eval_every=2, save_every=2, lr=1e-3)
    d["output_dir"] = str(tmp_path / "run")
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return cfglib.from_dict(d)


def test_short_grpo_run_logs_rewards_kl_and_rollouts(tmp_path, tiny_hf, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _config(tmp_path, tiny_hf, ["my_rewards:answer_and_first_token", "format"], grpo={"beta": 0.05},
                  data={"eval": None, "eval_fraction": 0.01},
                  evaluate={"generate": str(ROOT / "recipes" / "data" / "quickstart_eval.jsonl"), "limit": 2,
                            "max_new_tokens": 4, "before_training": False})
    run = RunDir(train(cfg))
    rows = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    steps = [r for r in rows if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"loss", "reward", "reward_std", "reward_answer_and_first_token", "reward_format", "completion_length",
                "kl", "clip_fraction"} <= set(r)
        assert r["clip_fraction"] == 0  # one update per rollout batch: the ratio is 1
        assert 1 <= r["completion_length"] <= 8 and r["kl"] >= 0
    assert steps[0]["kl"] == 0  # fresh adapters: the policy is the reference
    assert any(r["grad_norm"] > 0 for r in steps)
    evals = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in evals] == [2, 4] and all("eval_reward_format" in r for r in evals)
    rollouts = [json.loads(x) for x in run.rollouts.read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert {"prompt", "completion", "reward", "advantage", "reward_answer_and_first_token"} <= set(rollouts[0])
    assert rollouts[0]["prompt"].endswith("<|start|>assistant")
    assert json.loads(run.summary.read_text())["eval_prompts"] == 2  # evaluate.generate on conversations
    from finetune.export import export

    report = export(run.path, "mxfp4", tmp_path / "mxfp4", calib_tokens=128)  # calibrated on the prompts
    assert report.calibration_tokens == 128 and report.experts_requantized > 0


def test_killed_grpo_run_resumes_bit_identical(tmp_path, tiny_hf):
    from resume_check import killed_and_resumed_equal_uninterrupted

    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    paths = []
    for name in ("whole", "killed"):
        cfg = tmp_path / f"{name}.yaml"
        d = _config(tmp_path / name, tiny_hf, [f"{tmp_path / 'my_rewards.py'}:answer_and_first_token"],
                    data={"eval": None}).to_dict()
        cfg.write_text(yaml.safe_dump(d))
        paths.append(cfg)
    killed_and_resumed_equal_uninterrupted(paths[0], paths[1], tmp_path / "killed" / "run", "step-2")
    a = (tmp_path / "whole" / "run" / "rollouts.jsonl").read_text()
    b = (tmp_path / "killed" / "run" / "rollouts.jsonl").read_text()
    assert a == b  # the same completions were sampled after the resume


def test_grpo_config_errors(tmp_path, tiny_hf):
    with pytest.raises(cfglib.ConfigError, match="at least one reward"):
        _config(tmp_path, tiny_hf, [])
    with pytest.raises(cfglib.ConfigError, match="reward_weights has 2 values for 1 rewards"):
        _config(tmp_path, tiny_hf, ["exact_match"], grpo={"reward_weights": [1.0, 2.0]})
    with pytest.raises(cfglib.ConfigError, match="num_generations must be at least 2"):
        _config(tmp_path, tiny_hf, ["exact_match"], grpo={"num_generations": 1})
    with pytest.raises(TrainingError, match="cannot import"):
        GRPO(_config(tmp_path, tiny_hf, ["nowhere:f"]), torch.device("cpu"))


@pytest.mark.slow
def test_grpo_raises_greedy_accuracy_of_a_weak_sft_adapter(tmp_path, tiny_hf):
    """The issue's check: from a briefly SFT-trained adapter whose sampled accuracy on held-out
    prompts is between 0.1 and 0.6, GRPO with a user's module:function reward raises greedy accuracy
    by at least 0.3 within 10 minutes on 2 cores. Measured: see the README (GRPO section)."""
    import time

    import model as modellib
    from finetune.generate import generate_grouped
    from finetune.run import attach_adapter
    from finetune.rewards import Completion

    prompts = [json.loads(x) for x in PROMPTS[1].read_text().splitlines()]

    def accuracy(adapter, temperature=0.0, samples=1):
        m = modellib.from_pretrained(tiny_hf, dtype=torch.float32)
        attach_adapter(m, adapter)
        import data as datalib

        rows, _ = datalib.load_prompts(PROMPTS[1])
        outs = generate_grouped(m.eval(), [r.prompt for r in rows for _ in range(samples)], max_new_tokens=32,
                                temperature=temperature, generator=torch.Generator().manual_seed(0))
        answers = [p["answer"] for p in prompts for _ in range(samples)]
        return sum(Completion.from_tokens(o) == a for o, a in zip(outs, answers)) / len(outs)

    sft = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    sft.pop("hardware")  # the test's checkpoint replaces the tiny-cpu hardware file
    sft["model"] = {"path": str(tiny_hf)}
    sft["train"].update(max_steps=80, save_every=None, eval_every=None)
    sft["lora"].update(r=8, alpha=16)
    sft.pop("evaluate"), sft.pop("export")
    sft["output_dir"] = str(tmp_path / "sft")
    sft_run = RunDir(train(cfglib.from_dict(sft)))
    before, sampled = accuracy(sft_run.adapter), accuracy(sft_run.adapter, temperature=0.5, samples=4)
    assert 0.1 <= sampled <= 0.6, sampled  # a policy GRPO can learn from: sometimes right

    (tmp_path / "my_rewards.py").write_text("def right_sound(completions, prompts, answer, **_):\n"
                                           "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n")
    g = yaml.safe_load((ROOT / "recipes" / "quickstart-grpo.yaml").read_text())
    g.pop("hardware")  # the test's checkpoint replaces the tiny-cpu hardware file
    g["model"] = {"path": str(tiny_hf), "adapter": str(sft_run.adapter)}
    g["data"].update(train=str(PROMPTS[0]), eval=None)
    g["grpo"]["rewards"] = [f"{tmp_path / 'my_rewards.py'}:right_sound"]
    g["train"].update(max_steps=120, eval_every=None, save_every=None)
    g["output_dir"] = str(tmp_path / "grpo")
    t0 = time.perf_counter()
    grpo_run = RunDir(train(cfglib.from_dict(g)))
    minutes = (time.perf_counter() - t0) / 60
    after = accuracy(grpo_run.adapter)
    print(f"greedy accuracy {before:.3f} -> {after:.3f} (sampled at T=0.5 before: {sampled:.3f}); GRPO {minutes:.1f} min")
    assert after - before >= 0.3 and minutes <= 10


@pytest.mark.slow
def test_grpo_runs_on_two_processes(tmp_path, tiny_hf):
    """DDP over gloo: each process samples its own prompts' completions (seeded by its rank) and
    the step's loss and rewards are averaged over both."""
    import subprocess
    import sys

    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path, tiny_hf, ["format", "exact_match"],
                                          train={"max_steps": 2, "batch_size": 1, "eval_every": 2}).to_dict()))
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                           "--mixed_precision", "no", "-m", "finetune.cli", "train", str(cfg)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("DDP, 2 processes, gloo")  # the engine line (finetune/distributed.py)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "lr" in r] == [1, 2] and any("eval_reward" in r for r in rows)
