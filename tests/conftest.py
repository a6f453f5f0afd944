"""Test setup: the offline vocab, offline wandb, and tiny checkpoints built on the spot (no downloads)."""

import os
from pathlib import Path

import pytest

_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab"
if _VOCAB.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_VOCAB))
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_VOCAB))
os.environ.setdefault("WANDB_MODE", "offline")
# Idle OpenMP workers spin by default; on a shared 2-core machine that made whole tests 2.5-4x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Runs' rendered-data cache (data.cache_dir's default) in a folder of this session, not in ~/.cache."""
    os.environ["GPTOSS_FT_CACHE"] = str(tmp_path_factory.mktemp("gptoss-ft-cache"))
    return os.environ["GPTOSS_FT_CACHE"]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A random tiny gpt-oss in the HF layout with MXFP4 experts."""
    from model.checkpoint import write_random
    from model.config import preset

    return write_random(tmp_path_factory.mktemp("ckpt") / "tiny-hf", preset("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory):
    """The same weights as `tiny_hf`, in OpenAI's original layout."""
    from model.checkpoint import write_random
    from model.config import preset

    return write_random(tmp_path_factory.mktemp("ckpt") / "tiny-orig", preset("tiny"), seed=0, layout="original")
