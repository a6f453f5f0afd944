"""The quickstart's synthetic task: name an animal's sound, reasoning first (analysis), then the answer (final).

A tiny random model cannot know the answer (base accuracy ~0) but can learn it: the animal is one
token at the end of a prompt of random fillers, and held-out prompts pair animals with fillers and
templates never seen together in training. The same rows are also written as DPO preference pairs
(`quickstart_pairs_*.jsonl`) and GRPO prompts (`quickstart_prompts_*.jsonl`). Regenerate with
`python -m recipes.quickstart_data` (seeded, so the files are reproducible).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
    "owl": "hoot", "snake": "hiss", "horse": "neigh", "pig": "oink", "frog": "croak", "bee": "buzz",
}
ADJECTIVES = ["small", "old", "happy", "brown", "quiet", "tired", "young", "wild", "clever", "lazy", "big",
              "grey", "spotted", "hungry", "sleepy", "brave", "shy", "noisy", "gentle", "curious"]
PLACES = ["the farm", "the forest", "the city", "the river", "the zoo", "the garden", "the hills", "the barn",
          "the park", "the village", "the meadow", "the lake", "the desert", "the valley", "the island"]
# The animal comes last, a few tokens before the answer starts, so the tiny model's sliding-window
# layers (window 16) can see it too; the fillers before it vary so held-out prompts are new.
TEMPLATES = [
    "Something {adj} lives near {place}. Which sound does it make? It is {a_animal}",
    "Name the sound made by the {adj} creature from {place}, which is a {animal}",
    "At {place} I met a {adj} animal. What does it say? The animal: {animal}",
]
DEVELOPER = "Answer with the sound only, in lowercase."


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def row(animal: str, adj: str, place: str, template: str) -> dict:
    sound = SOUNDS[animal]
    return {
        "messages": [
            {"role": "system", "content": DEVELOPER},
            {"role": "user", "content": template.format(adj=adj, animal=animal, a_animal=_a(animal), place=place)},
            {"role": "assistant", "thinking": f"The animal is {_a(animal)}. It says {sound}.", "content": sound},
        ]
    }


def generate(seed: int = 0, n_train: int = 600, n_eval: int = 60) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    combos = [(a, adj, p, t) for a in SOUNDS for adj in ADJECTIVES for p in PLACES for t in TEMPLATES]
    rng.shuffle(combos)
    return [row(*c) for c in combos[:n_train]], [row(*c) for c in combos[n_train:n_train + n_eval]]


def preference(sft_row: dict) -> dict:
    """The same task as a DPO pair: the same reasoning, then the right sound (chosen) or the next
    animal's (rejected). Only the final answers differ; preferring chosen means answering what the
    model's own analysis says."""
    system, user, assistant = sft_row["messages"]
    sounds = list(SOUNDS.values())
    wrong = sounds[(sounds.index(assistant["content"]) + 1) % len(sounds)]
    return {"prompt": [system, user],
            "chosen": [{"role": "assistant", "thinking": assistant["thinking"], "content": assistant["content"]}],
            "rejected": [{"role": "assistant", "thinking": assistant["thinking"], "content": wrong}]}


def prompt(sft_row: dict) -> dict:
    """The same task as a GRPO prompt: the conversation up to the answer, and the answer for the reward."""
    system, user, assistant = sft_row["messages"]
    return {"prompt": [system, user], "answer": assistant["content"]}


def main() -> None:
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    train, evals = generate()
    for kind, make in (("", None), ("_pairs", preference), ("_prompts", prompt)):
        for split, rows in (("train", train), ("eval", evals)):
            name = f"quickstart{kind}_{split}.jsonl"
            (out / name).write_text("".join(json.dumps(make(r) if make else r) + "\n" for r in rows))
            print(f"wrote {len(rows)} rows to {out / name}")


if __name__ == "__main__":
    main()
