"""The callbacks and the Fisher import only torch and lightning, so any Lightning project can reuse them.

The check runs in a fresh interpreter that behaves as if the packages Lightning does not depend on
were not installed: a meta-path finder refuses to import them and hides their distributions, so
optional-import checks (``RequirementCache``, ``find_spec``) see them missing too.
"""

from __future__ import annotations

import subprocess
import sys

BLOCKED = ("safetensors", "hydra", "omegaconf", "timm", "torchvision", "transformers")
DISTRIBUTIONS = ("safetensors", "hydra-core", "omegaconf", "timm", "torchvision", "transformers")

CODE = f"""
import sys
from importlib.machinery import PathFinder

class NotInstalled(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        found = super().find_distributions(*args, **kwargs)
        return (d for d in found if (d.metadata["Name"] or "").lower() not in {DISTRIBUTIONS!r})

sys.meta_path[sys.meta_path.index(PathFinder)] = NotInstalled
import tl_lightning.callbacks
import tl_lightning.fisher
from tl_lightning.callbacks import EWC, L2SP, Freeze, GradualUnfreeze, LayerwiseLR, SourceRetention
print(sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_callbacks_and_fisher_import_without_optional_packages():
    result = _run(CODE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_the_packages_are_really_blocked():
    result = _run(CODE.replace("import tl_lightning.callbacks\n", "import safetensors.torch\n"))
    assert result.returncode != 0 and "'safetensors' (blocked)" in result.stderr
    version = "import importlib.metadata as m\nm.version('torchvision')\n"
    result = _run(CODE.replace("import tl_lightning.callbacks\n", version))
    assert "PackageNotFoundError" in result.stderr
