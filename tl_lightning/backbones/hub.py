"""Fail fast, naming what to download, instead of retrying downloads on a machine without internet."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import torch

#: Environment switches that declare the machine offline (no network probe is made).
OFFLINE_ENV = ("TL_LIGHTNING_OFFLINE", "HF_HUB_OFFLINE")
PROBE_TIMEOUT_S = 3.0


def is_offline(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a download from ``url`` cannot work: an :data:`OFFLINE_ENV` switch is set, or a TCP
    connection to its host (or to the ``HTTPS_PROXY``/``HTTP_PROXY`` in use) fails within ``timeout`` s.

    Example::

        if is_offline("https://download.pytorch.org/models/resnet18-f37072fd.pth"):
            raise RuntimeError("download the weights elsewhere")
    """
    if any(os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on") for key in OFFLINE_ENV):
        return True
    target = urlparse(url)
    proxy = os.environ.get(f"{target.scheme.upper()}_PROXY") or os.environ.get(f"{target.scheme}_proxy")
    if proxy:
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return False
    except (OSError, TypeError):
        return True


def torch_hub_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps the file of ``url`` (``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def first_url(value: object) -> str | None:
    """The first ``http(s)`` address inside a string, list or mapping (a dataset's ``url``/``mirrors``)."""
    if isinstance(value, str):
        return value if value.startswith(("http://", "https://")) else None
    items: Iterable = (
        value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    )
    return next((url for url in map(first_url, items) if url), None)
