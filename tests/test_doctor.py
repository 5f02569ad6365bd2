"""`kimivl doctor` reports the engines usable here, with vLLM present and with it unimportable."""
from __future__ import annotations

import subprocess
import sys

from conftest import BIN, ROOT


def _doctor(cmd, model):
    proc = subprocess.run([*cmd, "doctor", "--model", str(model)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout


def test_both_engines_with_vllm(tiny_model):
    rc, out = _doctor([str(BIN / "kimivl")], tiny_model)
    assert rc == 0, out
    assert "✓ engine vllm (default)" in out and "✓ engine transformers" in out
    assert "(remote code)" in out and "✓ engines: vllm, transformers" in out


def test_transformers_engine_alone_without_vllm(tiny_model):
    rc, out = _doctor([sys.executable, str(ROOT / "tests" / "no_vllm.py")], tiny_model)
    assert rc == 0, out
    assert "· engine vllm (default): not usable here" in out
    assert "✓ engines: transformers" in out and "ready to serve" in out


def test_not_ready_without_model_code_or_vllm(tiny_model, tmp_path):
    """A directory whose config names no model code, on a machine without vLLM: no engine."""
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("auto_map")
    (d / "config.json").write_text(json.dumps(cfg))
    rc, out = _doctor([sys.executable, str(ROOT / "tests" / "no_vllm.py")], d)
    assert rc == 1 and "✗ engines" in out, out
