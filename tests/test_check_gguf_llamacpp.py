"""scripts/check_gguf_llamacpp.py: its judgements, in Python alone (llama.cpp itself runs in the slow
test, when llama-cpp-python is installed)."""

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from data.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_gguf_llamacpp", ROOT / "scripts" / "check_gguf_llamacpp.py")
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check  # its dataclasses look their module up
_spec.loader.exec_module(check)


def _cut(pieces):
    enc = get_tokenizer()
    return [t for p in pieces for t in enc.encode_ordinary(p)]


def test_a_pre_tokenizer_cut_at_combining_marks_is_explained_and_other_differences_are_not():
    enc = get_tokenizer()
    hindi = "नमस्ते दुनिया"
    # llama.cpp's gpt-4o pre-tokenizer cuts before some combining marks that o200k keeps in a word
    pieces = ["नमस", "्त", "े", " द", "ुन", "िय", "ा"]
    theirs = _cut(pieces)
    assert theirs != enc.encode_ordinary(hindi)
    assert check.pre_tokenizer_split(hindi, theirs, enc) == pieces
    # identical tokens: the text's own o200k chunks
    assert "".join(check.pre_tokenizer_split("Hello, world", enc.encode_ordinary("Hello, world"), enc)) == "Hello, world"
    # a cut inside a word with no combining mark is not a pre-tokenizer difference this check excuses
    assert len(enc.encode_ordinary("hello")) == 1
    assert check.pre_tokenizer_split("hello world", _cut(["hel", "lo", " world"]), enc) is None
    # tokens that spell another text, or that are not o200k's encoding of any cut of the text
    assert check.pre_tokenizer_split(hindi, theirs[:-1], enc) is None
    merged_wrong = [enc.encode_single_token(b"h"), *enc.encode_ordinary("ello")]
    assert check.pre_tokenizer_split("hello", merged_wrong, enc) is None


def test_router_near_ties_are_the_last_chosen_and_first_left_out_experts_close():
    far = torch.tensor([[8.0, 6.0, 4.0, 2.0, 0.0, -2.0]])  # top-4 boundary gap 2 of a range 10
    close = torch.tensor([[8.0, 6.0, 4.0, 0.05, 0.0, -2.0]])  # 0.05 / 10 = 0.005
    assert check.router_near_ties([far], 4, 1e-2).tolist() == [False]
    assert check.router_near_ties([far, close], 4, 1e-2).tolist() == [True]  # any layer
    assert check.router_near_ties([close], 4, 1e-3).tolist() == [False]


def test_positions_over_the_tolerance_pass_only_at_router_near_ties():
    rel = torch.tensor([0.004, 0.3, 0.005, 0.2])
    near = torch.tensor([False, True, False, False])
    v = check.judge_positions(rel, near, 2e-2)
    assert v.explained == [1] and v.unexplained == [3] and v.worst_clean == pytest.approx(0.2)
    assert check.judge_divergence(0.01, 0.02, False) == "logit near-tie"
    assert check.judge_divergence(1.0, 0.02, True) == "router near-tie"
    assert check.judge_divergence(1.0, 0.02, False) is None


@pytest.mark.slow
def test_the_check_passes_on_a_fresh_export_and_leaves_no_files():
    """About 75 s on 2 CPU cores; needs llama-cpp-python (see the script's docstring)."""
    pytest.importorskip("llama_cpp")
    before = set(Path(tempfile.gettempdir()).glob("gguf-check-*"))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_gguf_llamacpp.py")], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout and "requantized (gptq)" in out.stdout
    assert set(Path(tempfile.gettempdir()).glob("gguf-check-*")) == before
