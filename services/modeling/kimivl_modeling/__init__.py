"""The project's PyTorch implementation of Kimi-VL, shipped as a model directory's remote code.

``configuration_kimi_vl.py`` and ``modeling_kimi_vl.py`` are self-contained (torch and
transformers only): :func:`install_remote_code` copies them into a model directory and points
its ``config.json`` ``auto_map`` at them, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads them from the
directory, the way the published checkpoint's own code is loaded.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_kimi_vl.py", "modeling_kimi_vl.py")
AUTO_MAP = {
    "AutoConfig": "configuration_kimi_vl.KimiVLConfig",
    "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration",
}


def install_remote_code(model_dir: str | Path, update_config: bool = True) -> None:
    """Copy the modeling files into ``model_dir`` and (if it has one) set its config's auto_map."""
    out = Path(model_dir)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(HERE / name, out / name)
    cfg_path = out / "config.json"
    if update_config and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["auto_map"] = dict(AUTO_MAP)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
