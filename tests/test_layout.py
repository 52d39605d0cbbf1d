"""The package's rooms import one way, and its top level stays nearly empty.

Every ``tl_lightning`` import in the package, function-level ones included, is read from the source
(no import is executed) and checked against the rooms each room may use: ``run/`` sits on top and
may use everything; nothing below imports ``run/``; ``callbacks/`` and ``fisher/`` use only each other
(and ``_modes``), so any Lightning project can take them (``test_callbacks_imports`` checks their
third-party imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

from hydra.utils import get_object

PACKAGE = Path(__file__).resolve().parent.parent / "tl_lightning"
CONF = PACKAGE.parent / "conf"
# room -> the other rooms its modules may import
MAY_IMPORT = {
    "_modes": set(),
    "fisher": {"_modes"},
    "callbacks": {"_modes", "fisher"},
    "objectives": set(),
    "backbones": set(),
    "data": {"backbones"},
    "modules": {"backbones", "objectives"},
    "adapters": {"_modes", "backbones", "callbacks", "modules", "objectives"},
    "analysis": {"_modes", "backbones", "data", "modules"},
    "run": {
        "_modes",
        "adapters",
        "analysis",
        "backbones",
        "callbacks",
        "data",
        "fisher",
        "modules",
        "objectives",
    },
}
# the package's own __init__ is the public entry point above every room (tl_lightning.load)
MAY_IMPORT["__init__"] = set(MAY_IMPORT)


def _room(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write tl_lightning.<room>... instead")
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if (
            isinstance(node, ast.ImportFrom) and node.module == "tl_lightning"
        ):  # from tl_lightning import data
            names = [f"tl_lightning.{alias.name}" for alias in node.names]
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tl_lightning" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


def test_every_room_imports_only_the_rooms_below_it():
    rooms = {_room(path) for path in PACKAGE.rglob("*.py")}
    assert rooms == set(MAY_IMPORT), "a new room needs its place in MAY_IMPORT"
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = _room(path)
        allowed = MAY_IMPORT.get(room, set()) | {room}
        upward += [
            f"{path.relative_to(PACKAGE)} imports tl_lightning.{r}" for r in _imported_rooms(path) - allowed
        ]
    assert not upward, "\n".join(upward)


def test_an_import_of_a_room_by_name_counts(tmp_path):
    """``from tl_lightning import modules`` imports that room as surely as ``import tl_lightning.modules``."""
    source = tmp_path / "example.py"
    source.write_text("from tl_lightning import modules, run\nimport tl_lightning.data.base\n")
    assert _imported_rooms(source) == {"modules", "run", "data"}


def test_the_top_level_holds_at_most_three_modules():
    assert len(list(PACKAGE.glob("*.py"))) <= 3, sorted(p.name for p in PACKAGE.glob("*.py"))


def test_every_conf_target_of_the_package_resolves():
    targets = set()
    for path in CONF.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            key, _, value = line.strip().partition(":")
            if key == "_target_" and value.strip().startswith("tl_lightning."):
                targets.add((path.relative_to(CONF), value.strip()))
    assert len(targets) > 30
    for path, target in sorted(targets):
        assert callable(get_object(target)), f"conf/{path}: _target_ {target} is not callable"
