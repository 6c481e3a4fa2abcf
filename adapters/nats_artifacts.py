"""Adapter artifacts (a PEFT adapter folder of safetensors + config) in a NATS object store.
Training puts them with their digest; serving gets them back and refuses any whose bytes do not
hash to the digest the version's manifest recorded, before a single weight is loaded."""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from pathlib import Path

import nats.js.errors
from nats.js import api

from agent_dpo.digest import folder_digest as artifact_digest
from agent_dpo.errors import AgentDpoError
from agent_dpo.logs import get_logger

ARTIFACT_BUCKET = "agentdpo-artifacts"
log = get_logger(component="artifacts")


class ArtifactDigestMismatch(AgentDpoError):
    """The artifact's content does not match the digest its manifest recorded."""


def _pack(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            info = tarfile.TarInfo(f.name if path.is_file() else f.relative_to(path).as_posix())
            info.size = f.stat().st_size
            info.mode = 0o644
            with f.open("rb") as fh:
                tar.addfile(info, fh)
    return buf.getvalue()


def _unpack(data: bytes, dest: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(dest, filter="data")  # "data" refuses absolute paths, links out, devices


async def open_object_store(js, bucket: str, description: str):
    """Open a file-backed object store, creating it if missing (a racing creator is fine)."""
    try:
        return await js.object_store(bucket)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        pass
    try:
        return await js.create_object_store(bucket, config=api.ObjectStoreConfig(
            bucket=bucket, storage=api.StorageType.FILE, description=description))
    except nats.js.errors.BadRequestError:
        return await js.object_store(bucket)


async def open_artifact_store(js, bucket: str = ARTIFACT_BUCKET):
    return await open_object_store(js, bucket, "agent-dpo adapter artifacts")


async def put_artifact(js, name: str, path: str | Path, bucket: str = ARTIFACT_BUCKET) -> str:
    """Store the adapter folder (or single file) under `name`; returns its content digest."""
    path = Path(path)
    digest = artifact_digest(path)
    store = await open_artifact_store(js, bucket)
    meta = api.ObjectMeta(name=name, description=digest, headers={"Agent-Dpo-Digest": digest})
    await store.put(name, _pack(path), meta=meta)
    log.info("artifact_stored", name=name, digest=digest)
    return digest


async def get_artifact(js, name: str, expected_digest: str, dest_root: str | Path,
                       bucket: str = ARTIFACT_BUCKET) -> Path:
    """Fetch into `dest_root/<digest hex>/` (reused if already there and intact) and verify the
    content digest first; a mismatch leaves nothing behind and raises ArtifactDigestMismatch."""
    if not expected_digest.startswith("sha256:"):
        raise ArtifactDigestMismatch(f"artifact {name}: manifest has no sha256 digest, refusing to load")
    dest = Path(dest_root) / expected_digest.split(":", 1)[1]
    if dest.is_dir() and artifact_digest(dest) == expected_digest:
        return dest
    store = await open_artifact_store(js, bucket)
    try:
        result = await store.get(name)
    except nats.js.errors.ObjectNotFoundError:
        raise AgentDpoError(f"artifact {name} not found in object store {bucket}") from None
    except nats.js.errors.DigestMismatchError:
        raise ArtifactDigestMismatch(f"artifact {name}: corrupted in transit (object digest)") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=dest.parent))
    try:
        _unpack(result.data, tmp)
        got = artifact_digest(tmp)
        if got != expected_digest:
            raise ArtifactDigestMismatch(f"artifact {name}: digest {got} does not match manifest "
                                         f"{expected_digest}; refusing to load")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("artifact_fetched", name=name, digest=expected_digest)
    return dest


def verify_local(path: str | Path, expected_digest: str) -> Path:
    """For artifacts referenced by path (shared disk): same check, no copy."""
    got = artifact_digest(path)
    if got != expected_digest:
        raise ArtifactDigestMismatch(f"artifact {path}: digest {got} does not match manifest "
                                     f"{expected_digest}; refusing to load")
    return Path(path)
