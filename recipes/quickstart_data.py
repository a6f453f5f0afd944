"""The quickstart's synthetic task: name an animal's sound, reasoning first (analysis), then the answer (final).

A tiny random model cannot know the answer (base accuracy ~0) but can learn it: the animal is one
token in a prompt of random fillers, and held-out prompts pair animals with fillers never seen in
training. Regenerate with `python -m recipes.quickstart_data` (seeded, so the files are reproducible).
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
TEMPLATES = [
    "The {adj} {animal} from {place} makes which sound?",
    "Which sound does a {adj} {animal} living near {place} make?",
    "What sound would you hear from the {adj} {animal} at {place}?",
]
DEVELOPER = "Answer with the sound only, in lowercase."


def row(animal: str, adj: str, place: str, template: str) -> dict:
    sound = SOUNDS[animal]
    return {
        "messages": [
            {"role": "system", "content": DEVELOPER},
            {"role": "user", "content": template.format(adj=adj, animal=animal, place=place)},
            {"role": "assistant", "thinking": f"The animal is a {animal}. A {animal} says {sound}.", "content": sound},
        ]
    }


def generate(seed: int = 0, n_train: int = 600, n_eval: int = 60) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    combos = [(a, adj, p, t) for a in SOUNDS for adj in ADJECTIVES for p in PLACES for t in TEMPLATES]
    rng.shuffle(combos)
    return [row(*c) for c in combos[:n_train]], [row(*c) for c in combos[n_train:n_train + n_eval]]


def main() -> None:
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    train, evals = generate()
    for name, rows in (("quickstart_train.jsonl", train), ("quickstart_eval.jsonl", evals)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {out / name}")


if __name__ == "__main__":
    main()
