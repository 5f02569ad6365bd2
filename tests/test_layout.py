"""The README's Layout section against the tree: every folder it names exists, and every Python
package the project installs has its row."""
from __future__ import annotations

import re

import tomllib

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _layout_folders() -> list[str]:
    section = README.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+/)` \|", section, re.M)


def test_every_folder_in_the_layout_exists():
    folders = _layout_folders()
    assert len(folders) >= 8
    missing = [f for f in folders if not (ROOT / f).is_dir()]
    assert not missing, f"README Layout names folders that do not exist: {missing}"


def test_every_installed_package_has_a_row():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    listed = set(_layout_folders())
    unlisted = [name for name, path in config.items() if f"{path}/" not in listed]
    assert not unlisted, f"packages without a README Layout row: {unlisted}"
