"""The wheel installs ``jq`` and the jq-owned ``jq_models`` (from the repository's models/ folder),
never a top-level ``models`` package, and lists every subpackage of jq."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_package_list_is_complete_and_models_is_renamed():
  cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(cfg["packages"])
  on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "jq").rglob("__init__.py")
             if "__pycache__" not in p.parts}
  assert on_disk <= listed, f"add to pyproject's packages: {sorted(on_disk - listed)}"
  assert "models" not in listed and not any(p.startswith("models.") for p in listed)
  assert cfg["package-dir"] == {"jq_models": "models"}
  assert not [p for p in (ROOT / "models").iterdir() if p.is_dir() and (p / "__init__.py").exists()]


def test_installed_modules_come_from_the_jq_owned_name():
  import jq_models.registry
  assert Path(jq_models.registry.__file__).resolve().parent == (ROOT / "models").resolve()
