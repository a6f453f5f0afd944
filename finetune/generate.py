"""Generation for gpt-oss: sampling with a KV cache, Harmony prompts and completions, model loading.

    model = load_for_inference("runs/quickstart")            # a run dir, or a checkpoint (+ adapter)
    prompt = chat_prompt([{"role": "user", "content": "Hi"}], reasoning_effort="low")
    tokens = generate(model, prompt, max_new_tokens=256)
    reply = parse_completion(tokens)                          # reply.analysis, reply.final

A completion is what the model writes after the harness's `<|start|>assistant`: messages such as
`<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>`.
Generation stops on `<|return|>` or `<|call|>` (docs/ARCHITECTURE.md §4); `<|end|>` only ends one message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

import data as datalib
import model as modellib
from data.tokenizer import CALL, CHANNEL, END, MESSAGE, RETURN, START, get_tokenizer
from model import KVCache

from .run import RunDir, RunError, attach_adapter

STOP_IDS = (RETURN, CALL)


@torch.no_grad()
def generate(model, prompt_ids, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids=STOP_IDS, generator: torch.Generator | None = None) -> list[int]:
    """Sample up to `max_new_tokens` after `prompt_ids` (a list of ids); returns the new ids,
    including the stop token when one was produced. temperature 0 is greedy."""
    return generate_batch(model, [prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, stop_ids=stop_ids, generator=generator)[0]


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], *, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, stop_ids=STOP_IDS, generator: torch.Generator | None = None) -> list[list[int]]:
    """Completions of prompts of one length, decoded together with one KV cache (rows share
    positions, so no padding); each row stops at its first stop id (kept). temperature 0 is greedy;
    otherwise softmax(logits / temperature) truncated to the top_p nucleus, drawn with `generator`
    (on the CPU, so a seed gives the same tokens on any device)."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate_batch decodes prompts of one length together")
    device = next(model.parameters()).device
    cache = KVCache()
    stop = torch.tensor(stop_ids)
    ids = torch.tensor([list(p) for p in prompts], device=device)
    outs: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]  # [B, V]: the prompt's other rows are never formed
        tokens = sample(logits, temperature=temperature, top_p=top_p, generator=generator)
        for row, tok in enumerate(tokens.tolist()):
            if not done[row]:
                outs[row].append(tok)
        done |= torch.isin(tokens, stop)
        if done.all():
            break
        ids = tokens.view(-1, 1).to(device)
    return outs


def generate_grouped(model, prompts: list[list[int]], *, batch_size: int = 32, **kw) -> list[list[int]]:
    """`generate_batch` for prompts of any lengths: those of equal length are decoded together, at
    most `batch_size` rows at a time; completions come back in the prompts' order. With sampling,
    the draws depend on the grouping, which depends only on the prompts (a seeded generator gives
    the same completions again)."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    outs: list[list[int]] = [[] for _ in prompts]
    for group in by_length.values():
        for j in range(0, len(group), batch_size):
            rows = group[j:j + batch_size]
            for i, out in zip(rows, generate_batch(model, [prompts[i] for i in rows], **kw)):
                outs[i] = out
    return outs


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits [B, V]` (on the CPU): argmax at temperature 0, else a draw from
    the temperature-scaled softmax restricted to the smallest set of tokens whose probability
    reaches top_p (nucleus sampling, arXiv:1904.09751)."""
    logits = logits.float().cpu()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before a token already reached top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # Inverse-CDF draw: one uniform per row against the running sum (float64, so 201088 terms add up
    # exactly enough); torch.multinomial took 30x longer at this vocabulary size on CPU.
    cdf = probs.double().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


# -- Harmony prompts and completions -------------------------------------------------------------

def chat_prompt(messages: list[dict], *, reasoning_effort: str | None = None) -> list[int]:
    """Token ids for a conversation in the `messages` row format (system -> developer instructions,
    user, assistant with optional `thinking`), ending with `<|start|>assistant` for the model to go on."""
    return datalib.render_prompt(messages, reasoning_effort=reasoning_effort)


def prompt_of(input_ids: list[int], loss_mask: list[int]) -> list[int]:
    """The prompt of a training example: everything before its first trained token, i.e. what the
    harness writes before the model answers (it ends with `<|start|>assistant`)."""
    return list(input_ids[: loss_mask.index(1)])


@dataclass
class HarmonyMessage:
    channel: str | None
    content: str
    recipient: str | None = None
    content_type: str | None = None
    role: str = "assistant"
    terminator: int | None = None
    """`<|end|>`, `<|return|>`, `<|call|>`, or None when the output stopped mid-message."""


@dataclass
class Completion:
    messages: list[HarmonyMessage] = field(default_factory=list)

    @property
    def analysis(self) -> str:
        return "\n".join(m.content for m in self.messages if m.channel == "analysis")

    @property
    def final(self) -> str | None:
        """The final answer (None when the model wrote no final message)."""
        finals = [m.content for m in self.messages if m.channel == "final"]
        return finals[-1] if finals else None

    @property
    def tool_calls(self) -> list[HarmonyMessage]:
        return [m for m in self.messages if m.terminator == CALL or m.recipient not in (None, "all")]


def parse_completion(tokens: list[int]) -> Completion:
    """Split generated ids (after the prompt's `<|start|>assistant`) into Harmony messages. Lenient:
    output that breaks the format ends up as content rather than raising."""
    enc = get_tokenizer()
    out = Completion()
    i, n = 0, len(tokens)
    while i < n:
        head_start = i
        while i < n and tokens[i] != MESSAGE:
            i += 1
        header = tokens[head_start:i]
        if i == n:  # no <|message|>: what there is becomes content of an unknown channel
            if header:
                out.messages.append(HarmonyMessage(None, enc.decode(header)))
            break
        i += 1
        body_start = i
        while i < n and tokens[i] not in (END, RETURN, CALL):
            i += 1
        terminator = tokens[i] if i < n else None
        msg = _parse_header(enc.decode(header))
        msg.content, msg.terminator = enc.decode(tokens[body_start:i]), terminator
        out.messages.append(msg)
        i += 1
    return out


def _parse_header(text: str) -> HarmonyMessage:
    """`<|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json` and its variants
    (the first message's header has no `<|start|>assistant`: the prompt wrote it)."""
    channel_tok = get_tokenizer().decode([CHANNEL])
    text = text.removeprefix(get_tokenizer().decode([START]))
    role = "assistant"
    if m := re.match(r"[^\s<]+", text):  # an author before the channel / recipient
        role, text = m.group(0), text[m.end():]
    recipient = None
    if m := re.search(r"\s*to=(\S+?)(?=<\||\s|$)", text):
        recipient = m.group(1)
        text = text[: m.start()] + text[m.end():]
    channel = None
    if channel_tok in text:
        before, after = text.split(channel_tok, 1)
        parts = after.strip().split(None, 1)
        channel = parts[0] if parts else ""
        text = before + (parts[1] if len(parts) > 1 else "")
    content_type = text.strip() or None
    return HarmonyMessage(channel, "", recipient=recipient, content_type=content_type, role=role)


# -- loading ---------------------------------------------------------------------------------------

def load_for_inference(model_or_run: str, *, adapter: str | None = None, base: str | None = None,
                       dtype: torch.dtype | None = None, device: str | None = None):
    """A model ready to generate: a run directory (its base + adapter/, or its model/), or a checkpoint
    directory / hub id with an optional PEFT adapter directory. Experts stay MXFP4 when stored so.
    base: a LoRA run's base when it is not where the run recorded it; either way its fingerprint
    must be the run's (`RunDir.base`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device != "cpu" else torch.float32)
    path = model_or_run
    if RunDir.is_run(model_or_run):
        run = RunDir(model_or_run)
        weights = run.trained_weights()
        if run.config.tuning == "full":
            if base is not None:
                raise RunError(f"{run.path} is a full fine-tuning run: its model/ is the whole model, no base is read")
            path = weights
        else:
            adapter = adapter or weights
            path = run.base(base)
    elif base is not None:
        raise RunError(f"--base applies to a run directory; {model_or_run} is a checkpoint")
    m = modellib.from_pretrained(str(path), dtype=dtype, experts="mxfp4", device=device)
    if adapter is not None:
        attach_adapter(m, adapter)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m
