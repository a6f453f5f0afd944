"""Generation and `gptoss-ft chat`: KV-cache decoding equals full forwards, greedy decoding equals
transformers', Harmony prompts equal training prompts, completions parse, a tiny tuned model answers
in the trained format."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import data as datalib
import model as modellib
from data.tokenizer import CALL, END, RETURN, get_tokenizer
from finetune.cli import main
from finetune.generate import chat_prompt, generate, parse_completion, prompt_of
from finetune.run import save_adapter

ROOT = Path(__file__).resolve().parents[1]
ROW = json.loads((ROOT / "recipes" / "data" / "quickstart_train.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kv_cache_decoding_equals_the_full_forward(tiny_hf, impl):
    m = modellib.from_pretrained(tiny_hf, dtype=torch.float32)
    m.attn_implementation = impl
    ids = torch.randint(0, 200000, (2, 40), generator=torch.Generator().manual_seed(0))  # > sliding window 16
    with torch.no_grad():
        full = m(ids).logits
        cache = modellib.KVCache()
        steps = [m(ids[:, :21], cache=cache).logits] + [m(ids[:, i:i + 1], cache=cache).logits for i in range(21, 40)]
    assert len(cache) == 40
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_equals_transformers(tiny_hf):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.GptOssForCausalLM.from_pretrained(
        tiny_hf, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32)
    ours = modellib.from_pretrained(tiny_hf, dtype=torch.float32)
    prompt = chat_prompt([{"role": "user", "content": "What sound does a cow make?"}])
    got = generate(ours, prompt, max_new_tokens=12, stop_ids=())
    with torch.no_grad():
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == want


class _Scripted(torch.nn.Module):
    """A stand-in model whose next token follows a script, to test stopping."""

    def __init__(self, script):
        super().__init__()
        self.script, self.calls = list(script), 0
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, cache=None, **_):
        logits = torch.zeros(1, ids.shape[1], 201088)
        logits[0, -1, self.script[self.calls]] = 1.0
        self.calls += 1
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("stop", [RETURN, CALL])
def test_generation_stops_on_return_or_call_and_keeps_it(stop):
    assert generate(_Scripted([5, END, 7, stop, 9]), [1, 2], max_new_tokens=10) == [5, END, 7, stop]
    assert generate(_Scripted([5, 6, 7, 8]), [1], max_new_tokens=3) == [5, 6, 7]


def test_parse_completion_splits_analysis_final_and_tool_calls():
    enc = get_tokenizer()

    def parse(text):
        return parse_completion(enc.encode(text, allowed_special="all"))

    c = parse("<|channel|>analysis<|message|>A cow says moo.<|end|><|start|>assistant<|channel|>final<|message|>moo<|return|>")
    assert (c.analysis, c.final) == ("A cow says moo.", "moo")
    assert [m.terminator for m in c.messages] == [END, RETURN]
    call = parse("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Oslo\"}<|call|>")
    (m,) = call.tool_calls
    assert (m.channel, m.recipient, m.content_type, m.content) == (
        "commentary", "functions.get_weather", "<|constrain|>json", '{"city":"Oslo"}')
    assert call.final is None
    cut = parse("<|channel|>final<|message|>mo")
    assert cut.final == "mo" and cut.messages[0].terminator is None


def test_chat_prompt_is_what_training_conditions_on():
    """The chat prompt of a row's conversation equals the prompt part of its training example."""
    (ids, mask), = datalib.render_examples(datalib.to_conversation(ROW, "messages"), split_turns=False)
    asked = [m for m in ROW["messages"] if m["role"] != "assistant"]
    assert chat_prompt(asked) == prompt_of(ids, mask)
    assert get_tokenizer().decode(chat_prompt(asked)).endswith("<|start|>assistant")


@pytest.mark.slow  # minutes on a loaded 2-core machine
def test_chat_on_a_tiny_finetuned_model_answers_in_the_trained_format(tmp_path, tiny_hf, capsys):
    """Overfit one conversation, then `gptoss-ft chat RUN --prompt` gives its analysis and final."""
    (ex,), _ = datalib.load_examples([ROW], "messages")
    batch = datalib.collate([ex])
    m = modellib.from_pretrained(tiny_hf, dtype=torch.float32)
    torch.manual_seed(0)  # before add_lora: lora_A's init draws from the global generator
    modellib.add_lora(m, r=8, alpha=16, targets=("attention", "experts"))
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(60):  # measured: loss 0.10 and the exact trained answer
        m(batch["input_ids"], labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    run = tmp_path / "run"
    save_adapter(m, run / "adapter", base_model=str(tiny_hf))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_hf)}, "method": "lora",
                                                     "data": {"train": "train.jsonl"}, "output_dir": str(run)}))

    system, user, assistant = ROW["messages"]
    assert main(["chat", str(run), "--prompt", user["content"], "--system", system["content"],
                 "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"[analysis] {assistant['thinking']}", f"[final] {assistant['content']}"], out
