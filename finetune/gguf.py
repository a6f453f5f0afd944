"""`gptoss-ft export --format gguf`: the merged model as one GGUF file that llama.cpp, Ollama and
LM Studio run, with an Ollama `Modelfile` beside it.

What llama.cpp expects for its `gpt-oss` architecture (learned from its HF converter and gguf-py;
checked by loading the file in llama.cpp, scripts/check_gguf_llamacpp.py):
- names: `token_embd`, `output_norm`, `output`, and per block `attn_norm`, `attn_{q,k,v,output}`
  (weight and bias), `attn_sinks`, `post_attention_norm` (HF's post_attention_layernorm, the norm
  before the MoE), `ffn_gate_inp` (the router, weight and bias), `ffn_{gate,up,down}_exps` (weight
  and bias). HF's fused gate_up is split: even rows are the gate, odd rows the up projection.
- types: experts MXFP4; 2-D weights in bf16 (the source precision, so nothing is lost); norms,
  biases, sinks and the router in F32, as llama.cpp's converter forces them.
- shapes: GGUF lists dimensions innermost first, so a torch `[out, in]` weight is `{in, out}` and
  experts `[E, out, in]` are `{in, out, E}`.
- MXFP4 bytes (ggml's `block_mxfp4`): per 32 weights, the E8M0 scale byte first, then 16 bytes where
  byte j holds weight j in its low nibble and weight j+16 in its high nibble. HF stores the same
  codes and scales, but scales in their own tensor and byte j holding weights 2j (low) and 2j+1
  (high). Repacking is exact: codes and scale bytes are unchanged, only moved.

Streaming: the tensor directory is written first from the config alone (names and types; shapes
from the checkpoint's tensor list for that config, `expected_shapes`), then the tensors in that
order as `finetune.merge.merged_tensors` produces them one layer at a time; a layer's tensors are
dropped once written. Unchanged experts keep the base's MXFP4 bytes; experts training changed are
requantized the way `--format mxfp4` does it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import expected_shapes
from model.config import GptOssConfig

from .merge import ExportReport, merged_tensors
from .run import ExportError, Run, RunDir, open_run

ARCH = "gpt-oss"
MXFP4_BLOCK_BYTES = 17  # one E8M0 scale + 16 bytes of nibbles per 32 weights
STOP_TOKENS = ("<|return|>", "<|call|>")


# -- MXFP4: HF pair -> ggml blocks ----------------------------------------------------------------

def ggml_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """HF `_blocks [..., G, 16]` + `_scales [..., G]` (uint8) -> ggml `block_mxfp4` rows `[..., G*17]`."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # [..., G, 32] in weight order
    packed = codes[..., :16] | (codes[..., 16:] << 4)  # ggml pairs weight j with weight j+16
    return torch.cat((scales.unsqueeze(-1), packed), dim=-1).flatten(-2)


def hf_mxfp4(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `ggml_mxfp4`: ggml rows `[..., G*17]` -> HF (`_blocks [..., G, 16]`, `_scales [..., G]`)."""
    b = rows.unflatten(-1, (-1, MXFP4_BLOCK_BYTES))
    codes = torch.cat((b[..., 1:] & 0x0F, b[..., 1:] >> 4), dim=-1)  # [..., G, 32] in weight order
    return codes[..., 0::2] | (codes[..., 1::2] << 4), b[..., 0].contiguous()


# -- the tensor directory -------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One GGUF tensor: its name, the HF tensors it is made of, and how."""

    name: str
    sources: tuple[str, ...]
    kind: str
    """"bf16", "f32" or "mxfp4"."""
    shape: tuple[int, ...]
    """numpy shape of the data written (bytes per row for MXFP4), outermost first."""
    make: Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _take(name: str, rows: slice | None = None) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The HF tensor `name`, optionally only some rows along dim 1 (experts) or dim 0 (others)."""
    def make(t: dict[str, torch.Tensor]) -> torch.Tensor:
        x = t[name]
        if rows is None:
            return x
        return x[:, rows] if x.dim() >= 2 else x[rows]
    return make


def _experts(proj: str, rows: slice | None) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    def make(t: dict[str, torch.Tensor]) -> torch.Tensor:
        blocks, scales = t[proj + "_blocks"], t[proj + "_scales"]  # [E, out, G, 16], [E, out, G]
        if rows is not None:
            blocks, scales = blocks[:, rows], scales[:, rows]
        return ggml_mxfp4(blocks, scales)
    return make


# llama.cpp's names (see the module docstring), in file order: (GGUF name, HF name, kind); "model.layers.N." and
# "blk.N." prefix the per-layer ones. Biases without `attention_bias` and lm_head with tied embeddings
# are not in the checkpoint's tensor list and so not in the file.
_GLOBAL_TENSORS = (("token_embd.weight", "model.embed_tokens.weight", "bf16"),
                   ("output_norm.weight", "model.norm.weight", "f32"),
                   ("output.weight", "lm_head.weight", "bf16"))
_LAYER_TENSORS = (("attn_norm.weight", "input_layernorm.weight", "f32"),
                  ("attn_q.weight", "self_attn.q_proj.weight", "bf16"),
                  ("attn_q.bias", "self_attn.q_proj.bias", "f32"),
                  ("attn_k.weight", "self_attn.k_proj.weight", "bf16"),
                  ("attn_k.bias", "self_attn.k_proj.bias", "f32"),
                  ("attn_v.weight", "self_attn.v_proj.weight", "bf16"),
                  ("attn_v.bias", "self_attn.v_proj.bias", "f32"),
                  ("attn_output.weight", "self_attn.o_proj.weight", "bf16"),
                  ("attn_output.bias", "self_attn.o_proj.bias", "f32"),
                  ("attn_sinks.weight", "self_attn.sinks", "f32"),
                  ("post_attention_norm.weight", "post_attention_layernorm.weight", "f32"),
                  ("ffn_gate_inp.weight", "mlp.router.weight", "f32"),
                  ("ffn_gate_inp.bias", "mlp.router.bias", "f32"))
# (GGUF name, HF expert projection, its rows): HF interleaves gate (even) and up (odd) rows.
_EXPERT_TENSORS = (("ffn_gate_exps", "gate_up_proj", slice(0, None, 2)),
                   ("ffn_up_exps", "gate_up_proj", slice(1, None, 2)),
                   ("ffn_down_exps", "down_proj", None))


def _rows_taken(shape: tuple[int, ...], rows: slice | None) -> tuple[int, ...]:
    """An experts tensor's `shape` `[E, out, ...]` once only `rows` of its out dim are kept."""
    return shape if rows is None else (shape[0], len(range(shape[1])[rows]), *shape[2:])


def tensor_plan(config: GptOssConfig) -> list[Entry]:
    """Every tensor of the GGUF, in file order (the order `merged_tensors` produces its sources)."""
    shapes = expected_shapes(config, experts="mxfp4")
    plan = []

    def take(name: str, source: str, kind: str) -> None:
        if source in shapes:
            plan.append(Entry(name, (source,), kind, shapes[source], _take(source)))

    for name, source, kind in _GLOBAL_TENSORS:
        take(name, source, kind)
    for layer in range(config.num_hidden_layers):
        hf, blk = f"model.layers.{layer}.", f"blk.{layer}."
        for name, source, kind in _LAYER_TENSORS:
            take(blk + name, hf + source, kind)
        for name, proj, rows in _EXPERT_TENSORS:
            x = hf + "mlp.experts." + proj
            *lead, groups, _ = _rows_taken(shapes[x + "_blocks"], rows)  # [E, out, G, 16]
            plan.append(Entry(blk + name + ".weight", (x + "_blocks", x + "_scales"), "mxfp4",
                              (*lead, groups * MXFP4_BLOCK_BYTES), _experts(x, rows)))
            plan.append(Entry(blk + name + ".bias", (x + "_bias",), "f32", _rows_taken(shapes[x + "_bias"], rows),
                              _take(x + "_bias", rows)))
    return plan


def _to_numpy(t: torch.Tensor, kind: str) -> np.ndarray:
    if kind == "mxfp4":
        return t.contiguous().numpy()
    if kind == "f32":
        return t.float().contiguous().numpy()
    # numpy has no bf16: the raw 16-bit patterns go through as uint16.
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


# -- the tokenizer: tiktoken ranks -> GGUF byte-level BPE ---------------------------------------

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which llama.cpp's BPE vocab uses: printable
    Latin-1 bytes stand for themselves, the rest are shifted to code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


@functools.cache
def vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of o200k_harmony for a GGUF `gpt2`-model tokenizer.

    tiktoken has ranks, no merge list: the merge that makes token t is found by running BPE on t's
    bytes with only the tokens ranked below t, which always ends in exactly two parts. Listing the
    merges in the rank order of the tokens they make gives llama.cpp tiktoken's merge priority.
    """
    from data.tokenizer import get_tokenizer

    enc = get_tokenizer()
    if enc.n_vocab != vocab_size:
        raise ExportError(f"the model has {vocab_size} vocabulary rows but o200k_harmony has {enc.n_vocab}")
    specials = {enc.encode_single_token(s): s for s in enc.special_tokens_set}
    n_ranks = min(specials)  # ranks are 0..n_ranks-1; the special and reserved tokens follow
    pieces = [enc.decode_single_token_bytes(r) for r in range(n_ranks)]
    ranks = {b: r for r, b in enumerate(pieces)}
    # bytes -> text in C: Latin-1 decoding makes one character per byte, then remap those characters.
    remap = _byte_to_unicode()

    def text(b: bytes) -> str:
        return b.decode("latin-1").translate(remap)

    merges = []
    for rank, piece in enumerate(pieces):
        if len(piece) < 2:
            continue
        # Fast path: a single split into two lower-ranked tokens must be the merge.
        splits = [k for k in range(1, len(piece)) if ranks.get(piece[:k], rank) < rank > ranks.get(piece[k:], rank)]
        if len(splits) == 1:
            k = splits[0]
            merges.append(f"{text(piece[:k])} {text(piece[k:])}")
            continue
        parts = [piece[k:k + 1] for k in range(len(piece))]
        while len(parts) > 2:
            best, at = rank, -1
            for k in range(len(parts) - 1):
                r = ranks.get(parts[k] + parts[k + 1], rank)
                if r < best:
                    best, at = r, k
            if at < 0:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise ExportError(f"token {rank} of o200k_harmony has no BPE merge; the vocab is not o200k_base")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    tokens = [text(p) for p in pieces] + [specials[i] for i in range(n_ranks, vocab_size)]
    normal, control = 1, 3  # gguf TokenType.NORMAL / CONTROL
    types = [normal] * n_ranks + [control] * (vocab_size - n_ranks)
    return tokens, types, merges


# -- chat templates ---------------------------------------------------------------------------------

# Harmony as a Jinja chat template (llama.cpp, LM Studio): it renders, for the HF chat inputs
# (`messages`, `tools`, `reasoning_effort`, `add_generation_prompt`), exactly the text whose tokens
# gptoss-ft trains on and prompts with (`data.render_prompt` / `data.load_examples` of the same row;
# tests/test_gguf.py checks it against openai-harmony):
# - the default system message (identity, knowledge cutoff, `Reasoning: reasoning_effort`, default
#   medium; no date), with the functions line when there are tools;
# - a developer message with every system/developer row's text as `# Instructions` (joined by a
#   blank line) and the tools declared as Harmony's TypeScript-like namespace (data/harmony.py `_ts`:
#   nested objects, arrays, enums, oneOf, nullable, defaults, titles, examples, descriptions,
#   tools without parameters);
# - assistant `thinking` (or reasoning_content / reasoning) as analysis, content as final, tool calls
#   as commentary calls each followed by its result (paired by tool_call_id, else in order); the
#   analysis of turns that ended is dropped, as at inference;
# - with add_generation_prompt: the prompt ending `<|start|>assistant`; without: the training
#   example of the last assistant turn (its final ends with `<|return|>`).
# What Jinja cannot do is left to the caller: `parameters` and tool results are objects or text
# (not JSON strings to parse); floats in a tool's defaults print as Python prints them (the same
# digits; Harmony differs only in exponent form outside 1e-5..1e16); control characters other than
# \n, \r, \t in JSON strings of defaults and arguments are not escaped.
_JINJA_MACROS = (
    # serde_json's compact JSON (how Harmony prints defaults); py=true: Python's json.dumps (how
    # gptoss-ft writes tool-call arguments and results given as objects)
    r"{%- macro h_json(v, py=false) -%}"
    r"{%- if v is none -%}null"
    r"{%- elif v is boolean -%}{{- 'true' if v else 'false' -}}"
    r"{%- elif v is integer -%}{{- v|string -}}"
    r"{%- elif v is number -%}{{- h_float(v, py) -}}"
    r"{%- elif v is string -%}"
    r"""{{- '"' + v|replace('\\', '\\\\')|replace('"', '\\"')|replace('\n', '\\n')|replace('\r', '\\r')|replace('\t', '\\t') + '"' -}}"""
    r"{%- elif v is mapping -%}{{- '{' -}}{%- for k, x in v.items() -%}"
    r"""{{- (', ' if py else ',') if not loop.first else '' -}}{{- h_json(k|string, py) + (': ' if py else ':') + h_json(x, py) -}}"""
    r"{%- endfor -%}{{- '}' -}}"
    r"{%- else -%}{{- '[' -}}{%- for x in v -%}{{- (', ' if py else ',') if not loop.first else '' -}}{{- h_json(x, py) -}}"
    r"{%- endfor -%}{{- ']' -}}{%- endif -%}"
    r"{%- endmacro -%}"
    # a float: Python's repr digits; serde_json (ryu) writes 1e-7 / 1e16 / 0.00001 where Python writes 1e-07 / 1e+16 / 1e-05
    r"{%- macro h_float(v, py) -%}"
    r"{%- set s = v|string -%}"
    r"{%- if s in ('nan', 'inf', '-inf') -%}{{- {'nan': 'NaN', 'inf': 'Infinity', '-inf': '-Infinity'}[s] if py else 'null' -}}"
    r"{%- elif py or 'e' not in s -%}{{- s -}}"
    r"{%- else -%}{%- set mant = s.split('e')[0] -%}{%- set exp = s.split('e')[1]|int -%}"
    r"{%- if exp == -5 -%}{{- ('-' if mant.startswith('-') else '') + '0.0000' + mant.lstrip('-').replace('.', '') -}}"
    r"{%- else -%}{{- mant + 'e' + exp|string -}}{%- endif -%}{%- endif -%}"
    r"{%- endmacro -%}"
    r"{%- macro h_text(c) -%}"
    r"{%- if c is none -%}{%- elif c is string -%}{{- c -}}"
    r"{%- elif c is mapping -%}{{- h_json(c, true) -}}"
    r"{%- else -%}{%- for p in c -%}{{- p['text'] if p is mapping and p['text'] is string else '' -}}{%- endfor -%}{%- endif -%}"
    r"{%- endmacro -%}"
    # `default: ...` (data/harmony.py `_default`)
    r"{%- macro h_default(s, raw_enum) -%}"
    r"{%- set d = s['default'] -%}"
    r"{%- set is_enum = s['enum'] is defined and s['enum'] is iterable and s['enum'] is not string "
    r"and s['enum'] is not mapping and s['enum']|length > 0 -%}"
    r"""{%- if d is string and not is_enum -%}{{- 'default: "' + d + '"' -}}"""
    r"{%- elif d is string and raw_enum -%}{{- 'default: ' + d -}}"
    r"{%- else -%}{{- 'default: ' + h_json(d) -}}{%- endif -%}"
    r"{%- endmacro -%}"
    r"{%- macro h_nullable(s, t) -%}"
    r"{{- t + (' | null' if s is mapping and s['nullable'] is true and 'null' not in t else '') -}}"
    r"{%- endmacro -%}"
    # a JSON schema as a TypeScript type (data/harmony.py `_ts`)
    r"{%- macro h_ts(s, indent) -%}"
    r"{%- set one_of = s['oneOf'] if s is mapping and s['oneOf'] is defined else none -%}"
    r"{%- set ty = s['type'] if s is mapping and s['type'] is defined else none -%}"
    r"{%- if one_of is iterable and one_of is not string and one_of is not mapping -%}"
    r"{%- for v in one_of -%}"
    r"{{- '\n' + indent + ' | ' + h_nullable(v, h_ts(v, indent + '   ')) -}}"
    r"{%- set d = v['description'] if v is mapping and v['description'] is string else none -%}"
    r"{%- set dflt = h_default(v, false) if v is mapping and 'default' in v else none -%}"
    r"{%- if d is not none or dflt is not none -%}"
    r"{{- ' // ' + (d if d is not none else '') + (' ' if d is not none and dflt is not none else '') + (dflt if dflt is not none else '') -}}"
    r"{%- endif -%}{%- endfor -%}"
    r"{%- elif ty is iterable and ty is not string and ty is not mapping -%}"
    r"{%- set ns = namespace(names=[]) -%}"
    r"{%- for t in ty if t is string -%}{%- set ns.names = ns.names + ['number' if t == 'integer' else t] -%}{%- endfor -%}"
    r"{{- ns.names|join(' | ') if ns.names else 'any' -}}"
    r"{%- elif ty == 'object' -%}{{- h_object(s, indent) -}}"
    r"{%- elif ty == 'string' -%}"
    r"{%- set ns = namespace(enums=[]) -%}"
    r"{%- if s['enum'] is defined and s['enum'] is iterable and s['enum'] is not string and s['enum'] is not mapping -%}"
    r"""{%- for v in s['enum'] if v is string -%}{%- set ns.enums = ns.enums + ['"' + v + '"'] -%}{%- endfor -%}"""
    r"{%- endif -%}"
    r"{{- ns.enums|join(' | ') if ns.enums else 'string' -}}"
    r"{%- elif ty in ('number', 'integer') -%}number"
    r"{%- elif ty == 'boolean' -%}boolean"
    r"{%- elif ty == 'array' -%}{{- h_ts(s['items'], indent) + '[]' if 'items' in s else 'Array<any>' -}}"
    r"{%- else -%}any{%- endif -%}"
    r"{%- endmacro -%}"
    r"{%- macro h_object(s, indent) -%}"
    r"{%- if s['description'] is string -%}{{- indent + '// ' + s['description'] + '\n' -}}{%- endif -%}"
    r"{{- '{\n' -}}"
    r"{%- if s['properties'] is mapping -%}"
    r"{%- set req = s['required'] if s['required'] is defined and s['required'] is iterable and s['required'] is not string "
    r"and s['required'] is not mapping else [] -%}"
    r"{%- for key, val in s['properties'].items() -%}"
    r"{%- set mark = '' if key in req else '?' -%}"
    r"{%- set m = val is mapping -%}"
    r"{%- if m and val['title'] is string -%}{{- indent + '// ' + val['title'] + '\n' + indent + '//\n' -}}{%- endif -%}"
    r"{%- set desc = val['description'] if m and val['description'] is string else none -%}"
    r"{%- if not (m and 'oneOf' in val) and desc is not none -%}{{- indent + '// ' + desc + '\n' -}}{%- endif -%}"
    r"{%- if m and val['examples'] is defined and val['examples'] is iterable and val['examples'] is not string "
    r"and val['examples'] is not mapping and val['examples']|length > 0 -%}"
    r"{{- indent + '// Examples:\n' -}}"
    r"""{%- for e in val['examples'] if e is string -%}{{- indent + '// - "' + e + '"\n' -}}{%- endfor -%}"""
    r"{%- endif -%}"
    r"{%- if m and val['oneOf'] is defined and val['oneOf'] is iterable and val['oneOf'] is not string "
    r"and val['oneOf'] is not mapping -%}"
    r"{{- h_one_of_property(key + mark, val, val['oneOf'], desc, indent) -}}"
    r"{%- else -%}"
    r"{{- indent + key + mark + ': ' + h_nullable(val, h_ts(val, indent + '    ')) + ',' -}}"
    r"{%- if not (m and 'oneOf' in val) and m and 'default' in val -%}{{- ' // ' + h_default(val, true) -}}{%- endif -%}"
    r"{{- '\n' -}}"
    r"{%- endif -%}{%- endfor -%}{%- endif -%}"
    r"{{- indent + '}' -}}"
    r"{%- endmacro -%}"
    r"{%- macro h_one_of_property(name, val, variants, desc, indent) -%}"
    r"{%- set first = variants[0] if variants|length > 0 else none -%}"
    r"{%- set above = desc is not none and not (first is mapping and first['description'] is defined "
    r"and first['description'] == desc) -%}"
    r"{%- if above -%}{{- indent + '// ' + desc + '\n' -}}{%- endif -%}"
    r"{%- if 'default' in val -%}{{- indent + '// ' + h_default(val, true) + '\n' -}}{%- endif -%}"
    r"{{- indent + name + ':\n' -}}"
    r"{%- for v in variants -%}"
    r"{{- indent + ' | ' + h_nullable(v, h_ts(v, indent + '   ')) -}}"
    r"{%- set vd = v['description'] if v is mapping and v['description'] is string else none -%}"
    r"{%- set n1 = vd if not (loop.first and above) and vd is not none and vd != desc else none -%}"
    r"{%- set n2 = h_default(v, true) if v is mapping and 'default' in v else none -%}"
    r"{%- if n1 is not none or n2 is not none -%}"
    r"{{- ' // ' + (n1 if n1 is not none else '') + (' ' if n1 is not none and n2 is not none else '') + (n2 if n2 is not none else '') -}}"
    r"{%- endif -%}"
    r"{{- '\n' -}}"
    r"{%- endfor -%}"
    r"{{- indent + ',\n' -}}"
    r"{%- endmacro -%}"
)
_JINJA_BODY = (
    # 1. The conversation as Harmony messages (data/formats.py `from_messages`): system and developer
    #    rows become instructions; calls are paired with the tool rows that follow them.
    r"{%- set ns = namespace(instr=[], h=[]) -%}"
    r"{%- for m in messages -%}"
    r"{%- if m.role in ('system', 'developer') -%}{%- set ns.instr = ns.instr + [h_text(m.content)] -%}"
    r"{%- elif m.role == 'user' -%}{%- set ns.h = ns.h + [{'role': 'user', 'content': h_text(m.content)}] -%}"
    r"{%- elif m.role == 'assistant' -%}"
    r"{%- set content = h_text(m.content) -%}"
    r"{%- set thinking = m.thinking if m.thinking is defined and m.thinking else (m.reasoning_content if "
    r"m.reasoning_content is defined and m.reasoning_content else (m.reasoning if m.reasoning is defined and m.reasoning else '')) -%}"
    r"{%- set calls = m.tool_calls if m.tool_calls is defined and m.tool_calls else [] -%}"
    r"{%- if calls -%}"
    r"{%- if thinking or content -%}"
    r"{%- set ns.h = ns.h + [{'role': 'assistant', 'channel': 'analysis', 'content': h_text(thinking) or content}] -%}"
    r"{%- endif -%}"
    r"{%- set r = namespace(stop=false, results=[], pending=[], used=[], next=0) -%}"
    r"{%- for t in messages[loop.index0 + 1:] -%}"
    r"{%- if not r.stop and t.role == 'tool' -%}{%- set r.results = r.results + [t] -%}"
    r"{%- if t.tool_call_id is not defined or t.tool_call_id is none -%}{%- set r.pending = r.pending + [t] -%}{%- endif -%}"
    r"{%- else -%}{%- set r.stop = true -%}{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- for c in calls -%}"
    r"{%- set f = c.function if c.function is defined else c -%}"
    r"{%- set args = f.arguments if f.arguments is defined else {} -%}"
    r"{%- set ns.h = ns.h + [{'role': 'assistant', 'channel': 'commentary', 'to': f.name, "
    r"'content': args if args is string else h_json(args, true)}] -%}"
    r"{%- set found = namespace(result=none) -%}"
    r"{%- if c.id is defined and c.id is not none -%}"
    r"{%- for t in r.results -%}"
    r"{%- if found.result is none and t.tool_call_id is defined and t.tool_call_id == c.id -%}{%- set found.result = t -%}{%- endif -%}"
    r"{%- endfor -%}{%- endif -%}"
    r"{%- if found.result is none and r.next < r.pending|length -%}"
    r"{%- set found.result = r.pending[r.next] -%}{%- set r.next = r.next + 1 -%}{%- endif -%}"
    r"{%- if found.result is not none -%}"
    r"{%- set t = found.result -%}"
    r"{%- set ns.h = ns.h + [{'role': 'tool', 'name': t.name if t.name is defined and t.name else f.name, "
    r"'content': h_text(t.content)}] -%}"
    r"{%- endif -%}{%- endfor -%}"
    r"{%- else -%}"
    r"{%- if thinking -%}{%- set ns.h = ns.h + [{'role': 'assistant', 'channel': 'analysis', 'content': h_text(thinking)}] -%}{%- endif -%}"
    r"{%- set ns.h = ns.h + [{'role': 'assistant', 'channel': 'final', 'content': content}] -%}"
    r"{%- endif -%}{%- endif -%}{%- endfor -%}"
    # 2. Where turns end (data/harmony.py `turn_ends`, `render_for_completion`): analysis up to the
    #    end of the previous turn is dropped; without a generation prompt the example ends with the
    #    last assistant turn.
    r"{%- set e = namespace(last=-1, ends=[]) -%}"
    r"{%- for x in ns.h -%}{%- if x.role == 'assistant' -%}{%- set e.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    r"{%- for x in ns.h -%}"
    r"{%- set followed = not loop.last and ns.h[loop.index0 + 1].role == 'user' -%}"
    r"{%- if x.role == 'assistant' and (x.channel == 'final' or followed or (loop.index0 == e.last and not add_generation_prompt)) -%}"
    r"{%- set e.ends = e.ends + [loop.index0] -%}{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{%- set stop = ns.h|length - 1 -%}{%- set prev = e.ends[-1] if e.ends else (-1) -%}"
    r"{%- else -%}{%- set stop = e.ends[-1] if e.ends else ns.h|length - 1 -%}"
    r"{%- set prev = e.ends[-2] if e.ends|length > 1 else (-1) -%}{%- endif -%}"
    # 3. The text.
    r"{%- set has_tools = tools is defined and tools -%}"
    r"{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    r"Knowledge cutoff: 2024-06\n\nReasoning: ' + (reasoning_effort if reasoning_effort is defined and reasoning_effort else 'medium') + '\n\n"
    r"# Valid channels: analysis, commentary, final. Channel must be included for every message.' -}}"
    r"""{%- if has_tools -%}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." -}}{%- endif -%}"""
    r"{{- '<|end|>' -}}"
    r"{%- if ns.instr or has_tools -%}"
    r"{{- '<|start|>developer<|message|>' -}}"
    r"{%- if ns.instr -%}{{- '# Instructions\n\n' + ns.instr|join('\n\n') -}}{{- '\n\n' if has_tools else '' -}}{%- endif -%}"
    r"{%- if has_tools -%}"
    r"{{- '# Tools\n\n## functions\n\nnamespace functions {\n\n' -}}"
    r"{%- for t in tools -%}{%- set f = t.function if t.function is defined else t -%}"
    r"{%- set lines = (f.description if f.description is defined and f.description is string else '').split('\n') -%}"
    r"{%- for line in lines -%}{%- if not loop.last or line -%}"
    r"{{- '// ' + (line[:-1] if not loop.last and line.endswith('\r') else line) + '\n' -}}"
    r"{%- endif -%}{%- endfor -%}"
    r"{%- if f.parameters is defined and f.parameters is not none -%}"
    r"{{- 'type ' + f.name + ' = (_: ' + h_ts(f.parameters, '') + ') => any;\n\n' -}}"
    r"{%- else -%}{{- 'type ' + f.name + ' = () => any;\n\n' -}}{%- endif -%}"
    r"{%- endfor -%}"
    r"{{- '} // namespace functions' -}}"
    r"{%- endif -%}"
    r"{{- '<|end|>' -}}"
    r"{%- endif -%}"
    r"{%- for x in ns.h -%}"
    r"{%- set i = loop.index0 -%}"
    r"{%- if i > stop -%}"
    r"{%- elif x.role == 'user' -%}{{- '<|start|>user<|message|>' + x.content + '<|end|>' -}}"
    r"{%- elif x.role == 'tool' -%}"
    r"{{- '<|start|>functions.' + x.name + ' to=assistant<|channel|>commentary<|message|>' + x.content + '<|end|>' -}}"
    r"{%- elif x.channel == 'commentary' -%}"
    r"{{- '<|start|>assistant to=functions.' + x.to + '<|channel|>commentary <|constrain|>json<|message|>' + x.content + '<|call|>' -}}"
    r"{%- elif x.channel == 'analysis' -%}"
    r"{%- if i > prev -%}{{- '<|start|>assistant<|channel|>analysis<|message|>' + x.content + '<|end|>' -}}{%- endif -%}"
    r"{%- else -%}"
    r"{{- '<|start|>assistant<|channel|>final<|message|>' + x.content -}}"
    r"{{- '<|return|>' if i == stop and not add_generation_prompt else '<|end|>' -}}"
    r"{%- endif -%}{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"
)
HARMONY_JINJA = _JINJA_MACROS + _JINJA_BODY

# The same conversation rendering as an Ollama (Go text/template) TEMPLATE: system/user/assistant
# turns with the current turn's thinking; Ollama parses the Harmony reply itself. No tools: the tool
# schema Ollama gives templates has lost the request's property order and keywords such as defaults
# (see `modelfile`).
_OLLAMA_TEMPLATE = """<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06

Reasoning: {reasoning}

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{{{{- if .System }}}}<|start|>developer<|message|># Instructions

{{{{ .System }}}}<|end|>{{{{ end }}}}
{{{{- $lastUser := -1 }}}}
{{{{- range $i, $m := .Messages }}}}{{{{ if eq $m.Role "user" }}}}{{{{ $lastUser = $i }}}}{{{{ end }}}}{{{{ end }}}}
{{{{- range $i, $m := .Messages }}}}
{{{{- if eq $m.Role "user" }}}}<|start|>user<|message|>{{{{ $m.Content }}}}<|end|>
{{{{- else if eq $m.Role "assistant" }}}}
{{{{- if and $m.Thinking (gt $i $lastUser) }}}}<|start|>assistant<|channel|>analysis<|message|>{{{{ $m.Thinking }}}}<|end|>{{{{ end }}}}
{{{{- if $m.Content }}}}<|start|>assistant<|channel|>final<|message|>{{{{ $m.Content }}}}<|end|>{{{{ end }}}}
{{{{- end }}}}
{{{{- end }}}}<|start|>assistant"""


def modelfile(gguf_name: str, *, reasoning: str = "medium", num_ctx: int = 8192) -> str:
    """An Ollama Modelfile for the GGUF beside it (`ollama create NAME -f Modelfile`)."""
    template = _OLLAMA_TEMPLATE.format(reasoning=reasoning)
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in STOP_TOKENS)
    return (
        "# Ollama Modelfile written by gptoss-ft: ollama create NAME -f Modelfile && ollama run NAME\n"
        "# Needs Ollama 0.11.5 or newer (MXFP4 GGUF import). To change the reasoning effort, edit\n"
        "# `Reasoning:` below (low, medium or high). This template declares no tools: Ollama hands\n"
        "# templates a typed tool schema (properties in Ollama's order, keywords such as defaults not\n"
        "# passed on) from which the declarations the model was tuned on cannot be rebuilt; for tool\n"
        "# calling serve the GGUF with llama.cpp (llama-server --jinja) or LM Studio, which run the\n"
        "# file's exact Harmony template.\n"
        f"FROM ./{gguf_name}\n\n"
        f'TEMPLATE """{template}"""\n\n'
        f"{stops}"
        "# OpenAI's recommended sampling for gpt-oss.\n"
        "PARAMETER temperature 1\n"
        "PARAMETER top_p 1\n"
        f"PARAMETER num_ctx {num_ctx}\n"
    )


# -- writing ----------------------------------------------------------------------------------------

@dataclass
class GgufReport(ExportReport):
    modelfile: Path | None = None
    tensors: int = 0


def export_gguf(source, out, *, base: str | None = None, requant: str = "gptq", calib_tokens: int = 2048,
                calib_data: str | None = None, name: str | None = None, modelfile_out: bool = True,
                progress=None) -> GgufReport:
    """Write the merged model of `source` (a run directory, or a checkpoint directory) to the GGUF
    file `out`, and an Ollama `Modelfile` beside it. Experts training changed are requantized as
    `--format mxfp4` does (`requant`, `calib_tokens`, `calib_data` mean the same); unchanged ones
    keep their bytes."""
    if importlib.util.find_spec("gguf") is None:  # fail before any work
        raise ExportError("GGUF export needs the `gguf` package: pip install gguf")
    source, out = Path(source), Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: the GGUF output should be a file name ending in .gguf")
    if RunDir.is_run(source):
        run = open_run(source, base)
    elif (source / "config.json").is_file() or (source / "original").is_dir():
        run = Run.of_checkpoint(source)
        requant = "nearest"  # nothing was trained: experts are copied (or quantized once, if dense)
    else:
        raise ExportError(f"{source}: neither a run directory (config.yaml) nor a checkpoint (config.json)")
    report = GgufReport(out, "gguf")
    tensors = merged_tensors(run, "mxfp4", report, requant=requant, calib_tokens=calib_tokens, calib_data=calib_data,
                             progress=progress)
    # Always gptoss-ft's template, never the base's: it renders what the model was tuned on (OpenAI's
    # adds a current date and declares tools its own way).
    report.tensors = write_gguf(out, run.config, tensors,
                                name=name or source.resolve().name, chat_template=HARMONY_JINJA)
    if modelfile_out:
        report.modelfile = out.with_name("Modelfile")
        report.modelfile.write_text(modelfile(out.name))
    return report


def write_gguf(out: Path, config: GptOssConfig, tensors: Iterable[tuple[str, torch.Tensor]], *,
               name: str, chat_template: str) -> int:
    """Stream (HF name, tensor) pairs (HF MXFP4 experts) into the GGUF file `out`, atomically.
    Returns the number of GGUF tensors written."""
    import gguf

    if list(config.layer_types) != [("sliding_attention" if k % 2 == 0 else "full_attention")
                                    for k in range(config.num_hidden_layers)]:
        # llama.cpp's gpt-oss reads one sliding window and alternates, sliding first.
        raise ExportError("llama.cpp's gpt-oss needs alternating sliding/full layers, sliding first")
    rope = config.rope_scaling or {}
    if rope.get("rope_type", rope.get("type")) != "yarn":
        raise ExportError(f"llama.cpp's gpt-oss uses YaRN RoPE scaling; this model has {rope or 'none'}")
    plan = tensor_plan(config)
    tokens, types, merges = vocab(config.vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), ARCH)
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    c = config
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_expert_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)  # gpt-oss: heads * head_dim != hidden size
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_sliding_window(c.sliding_window)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", 4096))
    w.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", 32.0))
    w.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", 1.0))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")  # llama.cpp's name for the o200k pre-tokenizer regex
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(199998)  # <|startoftext|>
    w.add_eos_token_id(c.eos_token_id)  # <|return|>; llama.cpp also stops on <|call|> by its text
    w.add_pad_token_id(c.pad_token_id)  # <|endoftext|>
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)

    kinds = {"bf16": (np.uint16, gguf.GGMLQuantizationType.BF16), "f32": (np.float32, None),
             "mxfp4": (np.uint8, gguf.GGMLQuantizationType.MXFP4)}
    for e in plan:
        dtype, raw = kinds[e.kind]
        w.add_tensor_info(e.name, e.shape, np.dtype(dtype), int(np.prod(e.shape)) * np.dtype(dtype).itemsize, raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for e, data in _in_plan_order(plan, tensors):
            arr = _to_numpy(data, e.kind)
            if arr.shape != e.shape:
                raise ExportError(f"{e.name}: made shape {arr.shape}, planned {e.shape}")
            w.write_tensor_data(arr)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return len(plan)


def _in_plan_order(plan: list[Entry], tensors: Iterable[tuple[str, torch.Tensor]]
                   ) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Each planned GGUF tensor as soon as its HF sources have arrived; sources are dropped once the
    last entry that needs them is written, so only about one layer is held at a time."""
    last_use = {s: k for k, e in enumerate(plan) for s in e.sources}
    held: dict[str, torch.Tensor] = {}
    it = iter(tensors)
    for k, e in enumerate(plan):
        while not all(s in held for s in e.sources):
            try:
                name, t = next(it)
            except StopIteration:
                missing = [s for s in e.sources if s not in held]
                raise ExportError(f"{e.name}: the source has no {', '.join(missing)}") from None
            if name in last_use:
                held[name] = t
        yield e, e.make(held)
        for s in e.sources:
            if last_use[s] == k:
                del held[s]
