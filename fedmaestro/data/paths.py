"""Where data sets live, and whether a download may be tried.

The data root is, in order: the ``root`` argument (config key ``data.root``), the environment
variable ``FEDMAESTRO_DATA``, then ``data/`` in the current directory. Downloads (torchvision's)
are tried only when a connection to the data host opens within a few seconds; set
``FEDMAESTRO_OFFLINE=1`` to never try.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["resolve_root", "network_available", "try_download"]

ENV_ROOT = "FEDMAESTRO_DATA"
ENV_OFFLINE = "FEDMAESTRO_OFFLINE"
DEFAULT_ROOT = "data"
CONNECT_TIMEOUT_S = 3.0


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The absolute data root (see the module docstring for the order)."""
    if root is None:
        root = os.environ.get(ENV_ROOT) or DEFAULT_ROOT
    path = Path(root).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"data root {root} is a file, not a directory: point data.root (or {ENV_ROOT}) at the "
                         f"folder that holds the data sets")
    return path


def network_available(url: str) -> bool:
    """True when downloads are allowed and a TCP connection to ``url``'s host opens quickly."""
    if os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes"):
        return False
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def try_download(url: str, download) -> str | None:
    """Run ``download()`` when the network allows; None on success, else why it was not done."""
    if not network_available(url):
        return f"no download tried: {urlparse(url).hostname} is unreachable or {ENV_OFFLINE}=1"
    try:
        download()
    except Exception as e:  # noqa: BLE001 - any failure becomes part of the FileNotFoundError message
        return f"download from {urlparse(url).hostname} failed: {type(e).__name__}: {e}"
    return None
