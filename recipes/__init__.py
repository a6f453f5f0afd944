"""Recipes: what to train on which public dataset (recipes/NAME.yaml), each naming its default hardware
file (configs/*.yaml) with `hardware:`; the row mappings they use are in `data.mappings`.

    gptoss-ft recipes                                        # the table below, with planned memory
    gptoss-ft train recipes/NAME.yaml                        # on the recipe's default hardware
    gptoss-ft train recipes/NAME.yaml hardware=configs/gpt-oss-120b.yaml   # on other hardware
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DIR = Path(__file__).resolve().parent
PLANNED_MODELS = ("openai/gpt-oss-20b", "openai/gpt-oss-120b")
"""The models `gptoss-ft recipes` plans each recipe for."""


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    dataset: str
    """data.train, with its subset and split when they are not the defaults."""
    method: str
    learns: str
    hardware: str | None
    """The default hardware file, as the recipe names it."""
    planned_gib: dict[str, float]
    """Peak GPU memory per device planned for each of PLANNED_MODELS (offloading nothing)."""


def paths() -> list[Path]:
    return sorted(DIR.glob("*.yaml"))


def recipe(path: Path) -> Recipe:
    """One recipe, read as `gptoss-ft train` reads it (with its hardware file) and planned."""
    import yaml

    from finetune import config as cfglib
    from finetune.plan import plan_run

    cfg = cfglib.load(path, check_paths=False)  # a listing reads no data and no model
    d = cfg.data
    dataset = d.train + (f" ({d.subset})" if d.subset else "") + (f" [{d.split}]" if d.split != "train" else "")
    method = cfg.method if cfg.method in ("lora", "full") else f"{cfg.method} ({cfg.tuning})"
    planned = {m: round(plan_run(config=cfg, model=m).peak_bytes / 2**30, 1) for m in PLANNED_MODELS}
    named = (yaml.safe_load(path.read_text()) or {}).get("hardware")
    return Recipe(path.stem, path, dataset, method, cfg.description, named, planned)


def catalog() -> list[Recipe]:
    return [recipe(p) for p in paths()]
