"""From any dataset row to Harmony token ids and a loss mask.

    from data import load_examples, pack_examples, collate
    examples, report = load_examples("chats.jsonl", "messages", max_seq_len=2048)
    batch = collate(pack_examples(examples, 2048)[:8], pad_to=2048)
"""

from data.errors import DataError
from data.formats import FORMATS, to_conversation
from data.harmony import Message, render_examples
from data.pipeline import Example, LoadReport, collate, load_examples, pack_examples, shuffle, train_eval_split
from data.tokenizer import get_tokenizer

__all__ = [
    "DataError",
    "Example",
    "FORMATS",
    "LoadReport",
    "Message",
    "collate",
    "get_tokenizer",
    "load_examples",
    "pack_examples",
    "render_examples",
    "shuffle",
    "to_conversation",
    "train_eval_split",
]
