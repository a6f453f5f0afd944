"""From any dataset row to Harmony token ids and a loss mask.

    from data import load_examples, pack_examples, collate
    examples, report = load_examples("chats.jsonl", "messages", max_seq_len=2048)
    batch = collate(pack_examples(examples, 2048)[:8], pad_to=2048)

    pairs, report = load_pairs("prefs.jsonl", max_seq_len=2048)     # DPO: PreferencePair(chosen, rejected, row)
    prompts, report = load_prompts("tasks.jsonl", max_prompt_len=512)  # GRPO: PromptRow(prompt ids, columns, row)

Examples and packed rows are sequences over flat arrays (`data.store`); pass `cache_dir=` (e.g.
`default_cache_dir()`) to keep a render and reuse it.
"""

from data.errors import DataError
from data.formats import FORMATS, PAIR_FORMATS, PROMPT_FORMATS, to_conversation
from data.harmony import Message, render_examples, render_for_completion
from data.pipeline import (
    LoadReport,
    PreferencePair,
    PromptRow,
    collate,
    load_examples,
    load_pairs,
    load_prompts,
    pack_examples,
    render_prompt,
    shuffle,
    train_eval_split,
)
from data.store import Example, Examples, PackedRows, default_cache_dir
from data.tokenizer import get_tokenizer

__all__ = [
    "DataError",
    "Example",
    "Examples",
    "FORMATS",
    "LoadReport",
    "Message",
    "PAIR_FORMATS",
    "PROMPT_FORMATS",
    "PackedRows",
    "PreferencePair",
    "PromptRow",
    "collate",
    "default_cache_dir",
    "get_tokenizer",
    "load_examples",
    "load_pairs",
    "load_prompts",
    "pack_examples",
    "render_examples",
    "render_for_completion",
    "render_prompt",
    "shuffle",
    "to_conversation",
    "train_eval_split",
]
