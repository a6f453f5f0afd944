"""`gptoss-ft export --format gguf`: read the file back with the `gguf` package (its reader, its name
table and its MXFP4 decoder are the oracles) and compare every tensor with the source checkpoint.
Loading the file in llama.cpp itself is scripts/check_gguf_llamacpp.py (slow, builds llama.cpp)."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from finetune.cli import main  # noqa: E402
from finetune.gguf import HARMONY_JINJA, export_gguf, ggml_mxfp4, hf_mxfp4  # noqa: E402
from model import mxfp4  # noqa: E402
from model.checkpoint import Checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    assert main(["export", str(tiny_hf), "--format", "gguf", "--out", str(out)]) == 0
    return out, gguf.GGUFReader(out)


def _field(reader, key):
    return reader.fields[key].contents()


def _hf_name(gguf_name: str) -> str:
    """The HF tensor a GGUF tensor comes from, by gguf-py's own name table (gate/up as split tensors)."""
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.GPT_OSS, 2)
    base, suffix = gguf_name.rsplit(".", 1)
    hf = {names.get_name(f"model.layers.{b}.{m}", try_suffixes=()): f"model.layers.{b}.{m}"
          for b in range(2) for m in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                                      "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.sinks",
                                      "mlp.router", "mlp.experts.gate_proj", "mlp.experts.up_proj",
                                      "mlp.experts.down_proj")}
    hf.update({names.get_name(n, try_suffixes=()): n for n in ("model.embed_tokens", "model.norm", "lm_head")})
    return hf[base] + "." + suffix


def test_every_tensor_has_llama_cpp_name_type_shape_and_the_source_values(exported, tiny_hf):
    path, reader = exported
    src = Checkpoint(tiny_hf)
    c = src.config
    h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    T = gguf.GGMLQuantizationType
    want = {"token_embd.weight": (T.BF16, [h, c.vocab_size]), "output_norm.weight": (T.F32, [h]),
            "output.weight": (T.BF16, [h, c.vocab_size])}
    for b in range(c.num_hidden_layers):
        p = f"blk.{b}."
        want.update({
            p + "attn_norm.weight": (T.F32, [h]), p + "post_attention_norm.weight": (T.F32, [h]),
            p + "attn_q.weight": (T.BF16, [h, q]), p + "attn_q.bias": (T.F32, [q]),
            p + "attn_k.weight": (T.BF16, [h, kv]), p + "attn_k.bias": (T.F32, [kv]),
            p + "attn_v.weight": (T.BF16, [h, kv]), p + "attn_v.bias": (T.F32, [kv]),
            p + "attn_output.weight": (T.BF16, [q, h]), p + "attn_output.bias": (T.F32, [h]),
            p + "attn_sinks.weight": (T.F32, [c.num_attention_heads]),
            p + "ffn_gate_inp.weight": (T.F32, [h, e]), p + "ffn_gate_inp.bias": (T.F32, [e]),
            p + "ffn_gate_exps.weight": (T.MXFP4, [h, i, e]), p + "ffn_gate_exps.bias": (T.F32, [i, e]),
            p + "ffn_up_exps.weight": (T.MXFP4, [h, i, e]), p + "ffn_up_exps.bias": (T.F32, [i, e]),
            p + "ffn_down_exps.weight": (T.MXFP4, [i, h, e]), p + "ffn_down_exps.bias": (T.F32, [h, e]),
        })
    got = {t.name: (t.tensor_type, [int(d) for d in t.shape]) for t in reader.tensors}
    assert got == want  # GGUF lists dimensions innermost first

    for t in reader.tensors:
        hf = _hf_name(t.name)
        if ".mlp.experts." in hf:  # HF fuses gate (even rows) and up (odd rows)
            layer, kind = hf.split(".mlp.experts.")
            fused, rows = {"gate_proj": ("gate_up_proj", slice(0, None, 2)), "up_proj": ("gate_up_proj", slice(1, None, 2)),
                           "down_proj": ("down_proj", slice(None))}[kind.split(".")[0]]
            proj = f"{layer}.mlp.experts.{fused}"
        if t.tensor_type == T.MXFP4:
            ref = mxfp4.dequantize(src.get(proj + "_blocks")[:, rows], src.get(proj + "_scales")[:, rows],
                                   torch.float32)  # [E, out, in]
            decoded = gguf.quants.dequantize(t.data, T.MXFP4)  # gguf-py's own block_mxfp4 decoder
            np.testing.assert_array_equal(decoded.reshape(ref.shape), ref.numpy(), err_msg=t.name)
            continue
        if ".mlp.experts." in hf:
            ref = src.get(proj + "_bias", torch.float32)[:, rows]
        else:
            ref = src.get(hf.removesuffix(".weight") if hf.endswith("sinks.weight") else hf, torch.float32)
        data = t.data.view(np.int16) if t.tensor_type == T.BF16 else t.data
        if t.tensor_type == T.BF16:
            data = torch.from_numpy(data.copy()).view(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(data.reshape(ref.shape), ref.numpy(), err_msg=t.name)


def test_metadata_hyperparameters_tokenizer_and_template(exported, tiny_hf):
    _, reader = exported
    c = Checkpoint(tiny_hf).config
    f = lambda k: _field(reader, k)  # noqa: E731
    assert f("general.architecture") == "gpt-oss"
    assert f("general.file_type") == gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    assert (f("gpt-oss.block_count"), f("gpt-oss.embedding_length"), f("gpt-oss.expert_feed_forward_length")) == (2, 64, 64)
    assert (f("gpt-oss.attention.head_count"), f("gpt-oss.attention.head_count_kv"),
            f("gpt-oss.attention.key_length")) == (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    assert (f("gpt-oss.expert_count"), f("gpt-oss.expert_used_count")) == (8, 4)
    assert f("gpt-oss.attention.sliding_window") == c.sliding_window
    assert f("gpt-oss.rope.freq_base") == c.rope_theta
    assert f("gpt-oss.rope.scaling.type") == "yarn" and f("gpt-oss.rope.scaling.factor") == 32.0
    assert f("gpt-oss.rope.scaling.original_context_length") == 4096
    assert f("gpt-oss.context_length") == c.max_position_embeddings

    from data.tokenizer import get_tokenizer

    enc = get_tokenizer()
    tokens, types, merges = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.token_type"), f("tokenizer.ggml.merges")
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") == "gpt-4o"
    assert len(tokens) == len(types) == c.vocab_size
    for tid, text in ((200002, "<|return|>"), (200012, "<|call|>"), (200006, "<|start|>"), (199999, "<|endoftext|>"),
                      (200005, "<|channel|>"), (201087, "<|reserved_201087|>")):
        assert tokens[tid] == text and types[tid] == gguf.TokenType.CONTROL
    assert (f("tokenizer.ggml.eos_token_id"), f("tokenizer.ggml.bos_token_id"),
            f("tokenizer.ggml.padding_token_id")) == (200002, 199998, 199999)
    # Byte-level text of ordinary tokens: " hello" is "Ġhello"; each merge makes a token from two.
    assert tokens[enc.encode_single_token(b" hello")] == "\u0120hello"
    vocab = set(tokens[:199998])
    for m in merges[:: len(merges) // 500]:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab, m
    assert f("tokenizer.chat_template") == HARMONY_JINJA  # the tiny base ships no template


# -- the chat template: rendered with jinja2 as llama.cpp's Python bindings, LM Studio's predecessor
# and transformers do, against openai-harmony (the oracle) and gptoss-ft's own renderer ---------------

WEATHER = {"type": "object", "description": "Where and how.", "properties": {
    "location": {"type": "object", "description": "The place.", "properties": {
        "city": {"type": "string"}, "country": {"type": "string", "default": "FR", "description": "ISO code"}},
        "required": ["city"]},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius", "description": "Temperature unit"},
    "days": {"type": "integer", "default": 3, "title": "Days"},
    "hours": {"type": "array", "items": {"type": "number"}, "examples": ["9", "17"]},
    "detail": {"oneOf": [{"type": "string", "description": "A level"}, {"type": "boolean", "default": False}],
               "description": "How much", "default": "low"},
    "threshold": {"type": ["number", "null"], "default": 0.5},
    "scale": {"type": "number", "default": 1e-7}, "big": {"type": "number", "default": 2.5e20},
    "tags": {"type": "array"}, "note": {"type": "string", "nullable": True},
    "filters": {"type": "object", "properties": {"kinds": {"type": "array", "items": {"type": "string", "enum": ["rain", "sun"]}}},
                "default": {"kinds": ["sun"], "strict": True}}},
    "required": ["location"]}
TOOLS = [("get_weather", "Gets the weather.\nIn a city.", WEATHER), ("get_time", "The time now.", None),
         ("noop", "", {"type": "object", "properties": {}})]
EFFORTS = ["low", "medium", "high"]


def _openai_tools(tools):
    """(name, description, parameters) as the OpenAI `tools` list a server hands the template."""
    return [{"type": "function", "function": {"name": n, "description": d, **({"parameters": p} if p is not None else {})}}
            for n, d, p in tools]


def _template(messages, *, tools=(), effort=None, generation_prompt=True) -> str:
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # the environment transformers and llama-cpp-python render chat templates in
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
    kwargs = {"reasoning_effort": effort} if effort else {}
    return env.from_string(HARMONY_JINJA).render(messages=messages, tools=_openai_tools(tools) or None,
                                                 add_generation_prompt=generation_prompt, **kwargs)


def _oracle(body, *, tools=(), instructions=None, effort="medium", training=False) -> list[int]:
    """openai-harmony's tokens of the conversation (earlier turns' analysis already left out of
    `body`, as Harmony asks of the harness)."""
    from harmony_oracle import ENC, developer, system
    from openai_harmony import Conversation, ReasoningEffort, RenderConversationConfig, Role

    head = [system(ReasoningEffort(effort.capitalize()))]
    if instructions is not None or tools:
        head.append(developer(instructions, list(tools)))
    conv = Conversation.from_messages(head + body)
    keep = RenderConversationConfig(auto_drop_analysis=False)
    if training:
        return ENC.render_conversation_for_training(conv, keep)
    return ENC.render_conversation_for_completion(conv, Role.ASSISTANT, keep)


def _check(text: str, oracle: list[int]) -> None:
    from data.tokenizer import get_tokenizer

    enc = get_tokenizer()
    assert text == enc.decode(oracle)
    # What llama.cpp feeds the model: the text tokenized with special tokens parsed.
    assert enc.encode(text, allowed_special="all") == oracle


def _conversations():
    """(name, HF messages, tools, instructions, openai-harmony body, training) of each shape."""
    from harmony_oracle import assistant, call, result, user

    args = '{"location": {"city": "Paris"}}'
    yield ("one user message", [{"role": "user", "content": "Hi"}], (), None, [user("Hi")], False)
    yield ("instructions, an earlier turn's reasoning dropped",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "thinking": "greet them", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
           TOOLS, "Be brief.", [user("Hi"), assistant("Hello!", "final"), user("Bye")], False)
    yield ("a tool call awaiting the answer: its reasoning kept",
           [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "thinking": "Use the tool.",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "content": "18C"}],
           TOOLS, None, [user("Weather in Paris?"), assistant("Use the tool.", "analysis"), call("get_weather", args),
                         result("get_weather", "18C")], False)
    yield ("parallel calls paired by id, arguments as objects, developer and system rows joined",
           [{"role": "developer", "content": "Use tools."}, {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Time and weather?"},
            {"role": "assistant", "content": "Both tools.",
             "tool_calls": [{"id": "a", "function": {"name": "get_time", "arguments": {}}},
                            {"id": "b", "function": {"name": "get_weather", "arguments": {"location": {"city": "Oslo"}, "days": 2}}}]},
            {"role": "tool", "tool_call_id": "b", "content": "3C"}, {"role": "tool", "tool_call_id": "a", "content": "noon"},
            {"role": "assistant", "thinking": "Answer.", "content": "Noon, 3C."}, {"role": "user", "content": "Thanks"}],
           TOOLS, "Use tools.\n\nBe kind.",
           [user("Time and weather?"), call("get_time", "{}"), result("get_time", "noon"),
            call("get_weather", '{"location": {"city": "Oslo"}, "days": 2}'), result("get_weather", "3C"),
            assistant("Noon, 3C.", "final"), user("Thanks")], False)
    yield ("a training example: the last turn's reasoning and calls kept, <|return|> at the end",
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "thinking": "t0", "content": "Hello"},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "thinking": "t1", "tool_calls": [{"function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "name": "get_weather", "content": "18C"},
            {"role": "assistant", "thinking": "t2", "content": "18C in Paris."}],
           TOOLS, None, [user("Hi"), assistant("Hello", "final"), user("Weather?"), assistant("t1", "analysis"),
                         call("get_weather", args), result("get_weather", "18C"), assistant("t2", "analysis"),
                         assistant("18C in Paris.", "final")], True)


@pytest.mark.parametrize("effort", EFFORTS)
@pytest.mark.parametrize("case", list(_conversations()), ids=lambda c: c[0])
def test_chat_template_renders_what_openai_harmony_and_gptoss_ft_render(case, effort):
    from data.formats import from_messages, prompt_conversation
    from data.harmony import render_examples, render_for_completion

    _, messages, tools, instructions, body, training = case
    text = _template(messages, tools=tools, effort=effort, generation_prompt=not training)
    oracle = _oracle(body, tools=tools, instructions=instructions, effort=effort, training=training)
    _check(text, oracle)
    row = {"tools": _openai_tools(tools)}
    if training:  # the example gptoss-ft trains on for the conversation's last turn
        ours = render_examples(from_messages({**row, "messages": messages}), split_turns=False, reasoning_effort=effort)[0][0]
    else:  # the prompt gptoss-ft chat and GRPO sample from
        ours = render_for_completion(prompt_conversation({**row, "prompt": messages}), reasoning_effort=effort)
    assert ours == oracle


@pytest.mark.parametrize("seed", range(40))
def test_chat_template_declares_random_tool_schemas_as_harmony_does(seed):
    """Seeded schemas from the renderer's own test (nested objects, arrays, enums, oneOf, type lists,
    nullable, titles, examples, every kind of default), against openai-harmony."""
    import random

    from harmony_oracle import user
    from test_data_harmony import _object

    rng = random.Random(seed)
    descriptions = ["Gets it.", "Two\nlines", "", "CRLF\r\nlines\n"]
    tools = [(name, rng.choice(descriptions), None if name == "noop" else _object(rng))
             for name in rng.sample(["get_weather", "search_docs", "add", "noop"], rng.randint(1, 3))]
    effort = rng.choice(EFFORTS)
    text = _template([{"role": "user", "content": "Go"}], tools=tools, effort=effort)
    oracle = _oracle([user("Go")], tools=tools, effort=effort)
    from data.tokenizer import STARTOFTEXT, get_tokenizer

    enc = get_tokenizer()
    assert text == enc.decode(oracle)
    # Schema text may hold look-alikes of special tokens ("<|end|>" in a description), which any
    # template's text becomes real special tokens in the server's tokenizer; elsewhere, tokens too.
    if sum(text.count(s) for s in enc.special_tokens_set) == sum(t >= STARTOFTEXT for t in oracle):
        assert enc.encode(text, allowed_special="all") == oracle


def test_mxfp4_repacking_is_exact_and_pairs_weight_j_with_j_plus_16():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 140, (3, 5, 2), dtype=torch.uint8, generator=gen)
    rows = ggml_mxfp4(blocks, scales)
    assert rows.shape == (3, 5, 34)
    b2, s2 = hf_mxfp4(rows)
    assert torch.equal(b2, blocks) and torch.equal(s2, scales)
    # One block by hand: weight 0 low nibble of HF byte 0; weight 16 low nibble of HF byte 8.
    one = ggml_mxfp4(torch.tensor([[0x21] + [0] * 7 + [0x43] + [0] * 7], dtype=torch.uint8), torch.tensor([127], dtype=torch.uint8))
    assert one.tolist() == [127, 0x31, 0x42] + [0] * 14  # byte j = weight j | weight j+16 << 4
    assert gguf.quants.dequantize(one.numpy(), gguf.GGMLQuantizationType.MXFP4)[[0, 1, 16, 17]].tolist() == [0.5, 1.0, 1.5, 2.0]


def test_modelfile_sits_next_to_the_gguf(exported):
    path, _ = exported
    text = (path.parent / "Modelfile").read_text()
    assert "FROM ./tiny.gguf" in text
    assert 'PARAMETER stop "<|return|>"' in text and 'PARAMETER stop "<|call|>"' in text
    assert "<|start|>assistant" in text and "{{ .System }}" in text


def test_run_dir_export_folds_the_lora_in(tmp_path, tiny_hf):
    import model as modellib
    from finetune.config import from_dict
    from finetune.export import export
    from finetune.run import RunDir, save_adapter

    m = modellib.from_pretrained(tiny_hf, dtype=torch.float32, experts="mxfp4")
    modellib.add_lora(m, r=4, alpha=8, targets=["attention"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    run = tmp_path / "run"
    save_adapter(m, run / "adapter", base_model=str(tiny_hf))
    RunDir(run).start(from_dict({"model": {"path": str(tiny_hf)}, "method": "lora",
                                 "lora": {"r": 4, "alpha": 8, "targets": ["attention"]},
                                 "data": {"train": "train.jsonl"}, "output_dir": str(run)}, check_paths=False))
    r = export_gguf(run, tmp_path / "out" / "run.gguf", requant="nearest")
    assert r.experts_copied == 2 * 2 * 8 and r.experts_requantized == 0
    merged = Checkpoint(export(run, "merged", tmp_path / "merged").path)
    reader = gguf.GGUFReader(r.path)
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    got = torch.from_numpy(q.data.view(np.int16).copy()).view(torch.bfloat16)
    assert torch.equal(got, merged.get("model.layers.1.self_attn.q_proj.weight"))
    assert not torch.equal(got, Checkpoint(tiny_hf).get("model.layers.1.self_attn.q_proj.weight"))


def test_gguf_export_errors_are_one_line(tmp_path, tiny_hf, capsys):
    assert main(["export", str(tiny_hf), "--format", "gguf", "--out", str(tmp_path / "x")]) == 2
    assert "ending in .gguf" in capsys.readouterr().err
