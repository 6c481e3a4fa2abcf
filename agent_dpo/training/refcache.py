"""Reference log-probs on disk: one JSON line per scored branch, in a file named after the reference
model's weights digest, keyed by the digest of the branch's prompt and completion tokens. Retraining on a
grown dataset (or the next DPO run on the same SFT base) computes only the branches it has not seen."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def branch_key(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
    """Digest of one (prompt, completion) token pair; the same pair always maps to the same entry."""
    digest = hashlib.sha256()
    digest.update(",".join(map(str, prompt_ids)).encode())
    digest.update(b"|")
    digest.update(",".join(map(str, completion_ids)).encode())
    return digest.hexdigest()[:32]


def weights_digest(model: Any) -> str:
    """sha256 over a model's parameter names, dtypes, shapes and bytes, adapters excluded: the reference is
    the base model (adapter disabled), so two runs on the same base share their cache."""
    import torch

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if "lora_" in name or "modules_to_save" in name:
            continue
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


class RefCache:
    """Owns one model's cache file: read once at open, appended to as new branches are scored."""

    def __init__(self, root: Path | None, model_digest: str):
        self.model_digest = model_digest
        self.values: dict[str, float] = {}
        self.path = None
        if root is not None:
            root = Path(root)
            root.mkdir(parents=True, exist_ok=True)
            self.path = root / (model_digest.replace(":", "-") + ".jsonl")
            if self.path.exists():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        entry = json.loads(line)
                        self.values[entry["k"]] = float(entry["v"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line from a killed run; the branch is just recomputed

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str) -> float | None:
        return self.values.get(key)

    def put_many(self, entries: Iterable[tuple[str, float]]) -> None:
        new = [(k, float(v)) for k, v in entries if k not in self.values]
        for k, v in new:
            self.values[k] = v
        if self.path is not None and new:
            # float repr round-trips exactly, so a cached value equals the computed one bit for bit
            text = "".join(json.dumps({"k": k, "v": v}) + "\n" for k, v in new)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
