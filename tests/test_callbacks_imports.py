"""tl_lightning.callbacks imports only torch and lightning, so any Lightning project can reuse it."""

from __future__ import annotations

import subprocess
import sys


def test_callbacks_import_neither_hydra_nor_timm():
    code = (
        "import sys, tl_lightning.callbacks; "
        "print(sorted(m for m in ('hydra', 'omegaconf', 'timm', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
