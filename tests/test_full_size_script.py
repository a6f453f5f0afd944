"""scripts/full_size.py, the full-size gpt-oss-20b end to end (hours), run here on the tiny preset so
the script itself is executed: every step's user command, the memory sampling, the report, and the
check of the MXFP4 export against the merged one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 40 s on 2 cores
def test_full_size_script_runs_every_step_on_the_tiny_preset(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/full_size.py"), "--work", str(work), "--preset", "tiny",
                           "--steps", "2", "--seq", "128"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["step"]: r for r in json.loads((work / "report.json").read_text())}
    assert list(rows) == ["init", "train", "adapter", "merged", "mxfp4", "gguf", "check"]
    assert all(r["wall_s"] > 0 and 0 < r["peak_anon_gib"] <= r["peak_rss_gib"] for r in rows.values())
    train = rows["train"]
    assert len(train["losses"]) == 2 and train["planned_gib"] > 0
    check = rows["check"]
    assert len(check["generated"]) >= 1
    for proj in ("gate_up_proj", "down_proj"):
        assert check[proj]["max_error_units"] <= 1.5 and check[proj]["relative_error"] < 0.1
    assert (work / "model.gguf").stat().st_size > 0 and (work / "export-adapter" / "adapter_model.safetensors").exists()
    assert not (work / "export-merged").exists() and (work / "merged-layer.safetensors").exists()
    assert "| mxfp4 |" in proc.stdout
