"""Recipes: what to train on which public dataset (recipes/NAME.yaml), each naming its default hardware
file (configs/*.yaml) with `hardware:`; the row mappings they use are in `data.mappings`.

    gptoss-ft recipes                                        # the list, with planned memory
    gptoss-ft train recipes/NAME.yaml                        # on the recipe's default hardware
    gptoss-ft train recipes/NAME.yaml hardware=configs/gpt-oss-120b.yaml   # on other hardware

This package holds data and imports nothing; `finetune.cli` reads and plans the recipes.
"""

from pathlib import Path

DIR = Path(__file__).resolve().parent


def paths() -> list[Path]:
    """The recipe files, by name."""
    return sorted(DIR.glob("*.yaml"))
