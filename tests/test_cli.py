"""The `gptoss-ft` entry point: help lists every subcommand; `init` writes a loadable checkpoint."""

import subprocess
import sys

from finetune.cli import COMMANDS, main
from model.checkpoint import Checkpoint


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("train", "export", "render", "plan", "chat", "init"):
        assert name in COMMANDS and name in out.stdout


def test_init_writes_a_complete_tiny_checkpoint(tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main(["init", "--out", str(tmp_path / "b"), "--seed", "3", "--layout", "original"]) == 0
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    a.validate()
    assert b.layout == "original"
    name = "model.layers.1.mlp.experts.down_proj_blocks"
    assert a.get(name).dtype.is_floating_point is False and (a.get(name) == b.get(name)).all()
    assert main(["init", "--out", str(tmp_path / "c"), "--seed", "4"]) == 0
    assert not (Checkpoint(tmp_path / "c").get(name) == a.get(name)).all(), "the seed matters"


def test_user_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not really a pickle")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from finetune.cli import main; sys.exit(main(sys.argv[1:]))",
         "init", "--preset", "tiyn", "--out", str(tmp_path / "x")],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "did you mean 'tiny'" in proc.stderr
