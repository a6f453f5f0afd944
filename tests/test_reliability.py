"""Issue 8: bad data, bad configs, untrusted inputs, crash safety of checkpoints, through the public CLI."""

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from finetune import state as statelib
from finetune.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

# line content -> what the error must say
BAD_ROWS = {
    b'{"messages": [{"role": "user", "content": "hi"}': "invalid JSON",
    b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}': "invalid UTF-8",
    b'{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}': "must be text",
    b'{"messages": "hello"}': "messages",
    b'{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}': "wizard",
    b'{"messages": []}': "empty",
    b'{"messages": [{"role": "user", "content": "hi"}]}': "no assistant",
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c1", "content": "4"}, '
    b'{"role": "assistant", "content": "x"}]}': "tool result with no tool call",
}


def _file(tmp_path, bad: bytes) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + bad + b"\n" + json.dumps(GOOD).encode() + b"\n")
    return path


@pytest.mark.parametrize("bad", list(BAD_ROWS), ids=list(BAD_ROWS.values()))
def test_each_malformed_row_is_named_by_line_without_traceback(tmp_path, capsys, bad):
    path = _file(tmp_path, bad)
    assert main(["render", str(path), "--format", "messages", "--jsonl"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and BAD_ROWS[bad] in err and "Traceback" not in err
    assert main(["render", str(path), "--format", "messages", "--jsonl", "--on-error", "skip"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2, "both good rows are kept"
    assert "skipped 1 rows" in err and f"{path}:2" in err


def _train_config(tmp_path, base, rows, **over) -> Path:
    cfg = {"model": {"path": str(base)}, "data": {"train": str(rows), "format": "messages", "max_seq_len": 128},
           "lora": {"r": 2, "alpha": 4, "targets": ["attention"]},
           "train": {"max_steps": 1, "batch_size": 2}, "output_dir": str(tmp_path / "run")}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_skips_bad_rows_when_asked_and_counts_them(tmp_path, tiny_hf, capsys):
    rows = tmp_path / "rows.jsonl"
    long_row = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    rows.write_bytes(b"\n".join([json.dumps(GOOD).encode(), *BAD_ROWS, json.dumps(long_row).encode(),
                                 json.dumps(GOOD).encode()]) + b"\n")
    assert main(["train", str(_train_config(tmp_path, tiny_hf, rows))]) == 2
    assert f"{rows}:2:" in capsys.readouterr().err
    assert main(["train", str(_train_config(tmp_path, tiny_hf, rows, data={"on_error": "skip"}))]) == 0
    out = capsys.readouterr().out
    assert f"skipped {len(BAD_ROWS)} rows" in out and "1 invalid UTF-8" in out
    assert "dropped 1 examples: 1 longer than max_seq_len=128" in out


def test_misspelt_config_key_is_named_without_traceback(tmp_path, tiny_hf):
    cfg = _train_config(tmp_path, tiny_hf, ROOT / "recipes" / "data" / "quickstart_eval.jsonl")
    proc = subprocess.run([sys.executable, "-m", "finetune.cli", "train", str(cfg), "train.learning_rate=1e-4"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown config key train.learning_rate" in proc.stderr


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["GPTOSS_FT_PWNED"]),))


def test_pickle_checkpoint_is_refused_by_train_and_never_runs(tmp_path):
    pwned = tmp_path / "pwned"
    os.environ["GPTOSS_FT_PWNED"] = str(pwned)
    try:
        ckpt = tmp_path / "pickled"
        ckpt.mkdir()
        (ckpt / "config.json").write_text("{}")
        (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit()))
        cfg = _train_config(tmp_path, ckpt, ROOT / "recipes" / "data" / "quickstart_eval.jsonl")
        proc = subprocess.run([sys.executable, "-m", "finetune.cli", "train", str(cfg)], capture_output=True, text=True)
        assert proc.returncode == 2 and "pickle" in proc.stderr and "Traceback" not in proc.stderr
        assert not pwned.exists()
    finally:
        del os.environ["GPTOSS_FT_PWNED"]


def test_special_token_strings_in_data_never_become_special_tokens():
    from data import load_examples
    from data.tokenizer import SPECIAL_TOKENS, get_tokenizer

    rng = random.Random(0)
    pieces = [*SPECIAL_TOKENS, "<|", "|>", "<|im_start|>", "assistant", "final", " to=functions.x", "\n", "é", "日本",
              "🙂", " ", "<", "|", ">", "{\"a\": 1}"]
    specials = set(SPECIAL_TOKENS.values()) | set(range(200000, 201088))
    enc = get_tokenizer()
    rows, texts = [], []
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        texts.append(text)
        rows.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]})
    examples, report = load_examples(rows, "messages")
    assert report.examples == 300
    for e, text in zip(examples, texts):
        ids = e.input_ids
        user = ids.index(enc.encode_ordinary("user")[0], ids.index(200006, 5))  # the user message's header
        body = ids[ids.index(200008, user) + 1: ids.index(200007, user)]
        assert not specials & set(body), text
        assert enc.decode(body) == text


def test_hub_failures_explain_how_to_work_offline(monkeypatch):
    from data import DataError, load_examples
    from model.checkpoint import Checkpoint, CheckpointError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="offline"):
        Checkpoint("no-such-org/no-such-model")
    with pytest.raises(DataError, match="offline"):
        load_examples("no-such-org/no-such-dataset", "messages")


# -- checkpoints ---------------------------------------------------------------------------------

def _tiny_optimizer():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(3, 4)
    opt.step()
    return p, opt


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_resumable(tmp_path):
    p, opt = _tiny_optimizer()
    ckpts = tmp_path / "checkpoints"
    statelib.save_checkpoint(ckpts, 4, trainable={"w": p}, optimizer=opt, param_names={p: "w"}, extra={}, keep=3)
    # What a kill leaves behind mid-save: a temp directory, or (had a rename raced) a step without state.json.
    (ckpts / ".step-6.tmp-deadbeef").mkdir()
    (ckpts / ".step-6.tmp-deadbeef" / "trainable.safetensors").write_bytes(b"partial")
    (ckpts / "step-8").mkdir()
    assert statelib.latest_checkpoint(ckpts) == ckpts / "step-4"
    q = torch.nn.Parameter(torch.zeros(3, 4))
    opt2 = torch.optim.AdamW([q], lr=0.1)
    state = statelib.load_checkpoint(ckpts / "step-4", params={"w": q}, optimizer=opt2)
    assert state["step"] == 4 and torch.equal(q, p)
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_disk_full_is_reported_with_the_path(tmp_path, monkeypatch):
    p, opt = _tiny_optimizer()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(statelib, "save_file", full)
    with pytest.raises(statelib.StateError, match=r"checkpoints/step-2: No space left on device"):
        statelib.save_checkpoint(tmp_path / "checkpoints", 2, trainable={"w": p}, optimizer=opt,
                                 param_names={p: "w"}, extra={}, keep=2)
    assert list((tmp_path / "checkpoints").iterdir()) == [], "no partial checkpoint is left"


def test_retention_keeps_the_newest(tmp_path):
    p, opt = _tiny_optimizer()
    for step in (1, 2, 3, 4):
        statelib.save_checkpoint(tmp_path, step, trainable={"w": p}, optimizer=opt, param_names={p: "w"},
                                 extra={}, keep=2)
    assert [c.name for c in statelib.list_checkpoints(tmp_path)] == ["step-3", "step-4"]


# Every run of the kill/resume check computes on one thread. On the shared 2-vCPU dev VM, some
# processes (3 of 25 in one series, 0 of 50 in a later one) computed x.exp() -- a five-line script,
# no gptoss-ft code -- 1 ulp differently on the half their second OpenMP thread handled, and never
# when pinned to one CPU. That is the machine, not the resume logic this test is about.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def test_three_sigkills_then_resume_equal_an_uninterrupted_run(tmp_path, tiny_hf):
    from safetensors.torch import load_file

    data = ROOT / "recipes" / "data" / "quickstart_eval.jsonl"
    over = {"train": {"max_steps": 8, "save_every": 1, "batch_size": 2, "grad_accum": 2, "lr": 1e-2},
            "lora": {"targets": ["attention", "experts"]}}
    (tmp_path / "ref").mkdir()
    train = [sys.executable, "-m", "finetune.cli", "train"]
    subprocess.run(train + [str(_train_config(tmp_path / "ref", tiny_hf, data, **over))], check=True,
                   env=ONE_THREAD, stdout=subprocess.DEVNULL)
    (tmp_path / "run").mkdir()
    cfg = _train_config(tmp_path / "run", tiny_hf, data, **over)
    ckpts = tmp_path / "run" / "run" / "checkpoints"
    # Three kills at different moments: after step 2 is saved, during start-up, after step 6 is saved.
    for wait_for in ("step-2", None, "step-6"):
        proc = subprocess.Popen(train + [str(cfg), "--resume"], env=ONE_THREAD,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + (240 if wait_for else 1.5)
        while proc.poll() is None and time.time() < deadline and not (wait_for and (ckpts / wait_for).exists()):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "run" / "run" / "adapter").exists()
    subprocess.run(train + [str(cfg), "--resume"], check=True, env=ONE_THREAD, stdout=subprocess.DEVNULL)
    ref = load_file(str(tmp_path / "ref" / "run" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "run" / "run" / "adapter" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
