"""GptOssConfig: presets, HF and original config.json, strictness; transformers' config as the oracle."""

import json

import pytest

from model.config import FULL, SLIDING, GptOssConfig, preset

# openai/gpt-oss-20b's config.json as released (transformers 4.55 era keys).
GPT_OSS_20B_JSON = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
GPT_OSS_120B_ORIGINAL_JSON = {
    "num_hidden_layers": 36, "num_experts": 128, "experts_per_token": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128, "initial_context_length": 4096,
    "rope_theta": 150000, "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}


def test_presets_have_the_released_values():
    c20 = preset("gpt-oss-20b")
    assert GptOssConfig.from_dict(GPT_OSS_20B_JSON) == c20
    assert (c20.num_hidden_layers, c20.num_local_experts, c20.num_experts_per_tok) == (24, 32, 4)
    c120 = preset("gpt-oss-120b")
    assert (c120.num_hidden_layers, c120.num_local_experts) == (36, 128)
    for c in (c20, c120):
        assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.head_dim) == (201088, 2880, 2880, 64)
        assert (c.num_attention_heads, c.num_key_value_heads, c.sliding_window) == (64, 8, 128)
        assert c.rms_norm_eps == 1e-5 and c.rope_theta == 150000 and c.swiglu_limit == 7.0
        assert c.rope_scaling["factor"] == 32 and c.rope_scaling["beta_fast"] == 32 and c.rope_scaling["beta_slow"] == 1
        assert c.rope_scaling["original_max_position_embeddings"] == 4096
        assert c.layer_types[0] == SLIDING and c.layer_types[1] == FULL and c.is_mxfp4


def test_original_config_maps_to_the_hf_one():
    from_original = GptOssConfig.from_dict(GPT_OSS_120B_ORIGINAL_JSON)
    assert from_original == preset("gpt-oss-120b").replace(quantization_config=None)
    assert GptOssConfig.from_dict(from_original.to_original_dict()) == from_original


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    bad = dict(GPT_OSS_20B_JSON, num_hiden_layers=3)
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"num_hiden_layers.*num_hidden_layers"):
        GptOssConfig.from_json(tmp_path / "config.json", strict=True)
    with pytest.warns(UserWarning, match="num_hiden_layers"):  # a real checkpoint still loads
        assert GptOssConfig.from_json(tmp_path / "config.json") == preset("gpt-oss-20b")
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        preset("tiyn")


def test_inconsistent_config_is_an_error():
    with pytest.raises(ValueError, match="multiple of 32"):
        GptOssConfig(hidden_size=100)
    with pytest.raises(ValueError, match="layer_types"):
        GptOssConfig(num_hidden_layers=3, layer_types=("sliding_attention",))


def test_transformers_reads_what_we_write_and_we_read_what_it_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = preset("tiny")
    (tmp_path / "config.json").write_text(json.dumps(ours.to_hf_dict()))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert theirs.model_type == "gpt_oss"
    for key in ("hidden_size", "num_local_experts", "num_experts_per_tok", "sliding_window", "head_dim",
                "num_key_value_heads", "swiglu_limit", "rms_norm_eps"):
        assert getattr(theirs, key) == getattr(ours, key), key
    assert list(theirs.layer_types) == list(ours.layer_types)
    assert theirs.rope_parameters["factor"] == 32 and theirs.rope_parameters["rope_theta"] == ours.rope_theta
    out = tmp_path / "theirs"
    theirs.save_pretrained(out)
    assert GptOssConfig.from_json(out / "config.json") == ours
