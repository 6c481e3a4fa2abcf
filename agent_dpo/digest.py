"""Content digests of model artifacts: training records one, the registry stores it, and serving
checks it before loading a single weight. One rule, so all three always agree."""

from __future__ import annotations

import hashlib
from pathlib import Path


def folder_digest(path: str | Path) -> str:
    """`sha256:<hex>` over a folder's files (sorted relative path, size and bytes of each), so the
    digest depends only on content, never on packing, mtimes or the order a disk lists files in."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        h.update(f"{rel}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return f"sha256:{h.hexdigest()}"
