"""One local copy per node of each remote checkpoint that transformers has to load.

transformers loads only from local directories, and every teacher replica (calibration actors,
teacher services, training workers loading the student) needs one. Copying a 61 GB teacher
once per replica costs N downloads and N times the disk on a node of N replicas; here the first
replica on a node downloads it and the others wait for that copy and share it.

Layout of the cache directory (`MOE2DENSE_CACHE_DIR`, else `~/.cache/moe2dense/checkpoints`):

- `NAME-S-V/`: a complete copy. S is a digest of the source URL, V of its listing (each file's
  name, size and the version fields its store reports: ETag, generation, modification time...),
  so a changed source is a new entry and never a stale hit. A source whose store reports only
  sizes cannot be told from another of the same shapes: it is copied privately, not cached.
- `.NAME-S-V.lock`: an `flock` taken exclusively to fill or evict the entry, shared while it is
  in use; its modification time is the entry's last use.
- `NAME-S-V.partial-X/`: a copy in progress, renamed to `NAME-S-V` only when every file is
  there with its listed size, so a kill leaves an entry complete or absent. The next run that
  may (it holds the lock) deletes what killed ones left.

An entry is evicted (renamed aside, then deleted) only under its exclusive lock, which no reader
holds: when a newer version of the same source arrives, or when the disk lacks room for a new
entry (least recently used first). The directory can be deleted whenever no run uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterator

from .errors import UserError

CACHE_ENV = "MOE2DENSE_CACHE_DIR"
# what stores report that changes whenever a file's bytes do (s3: ETag; gcs: generation, md5Hash;
# hf: blob_id, lfs; memory, sftp, http...: a modification or creation time)
VERSION_FIELDS = ("ETag", "etag", "VersionId", "generation", "md5Hash", "crc32c", "blob_id", "lfs",
                  "LastModified", "last_modified", "mtime", "updated", "created")
_HEADROOM = 1.02  # a filesystem wants a little room beyond the bytes themselves
_GARBAGE = re.compile(r"^(?P<entry>.+)\.(partial|evict)-[0-9a-f]{8}$")


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "moe2dense", "checkpoints")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _listing(fs, path: str, url: str, weights: bool) -> list[dict[str, Any]]:
    """The files of the checkpoint directory to copy (its top level; without weights, only metadata)."""
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise UserError(f"no such checkpoint: {url}") from None
    files = [e for e in entries if e.get("type") != "directory"]
    if not weights:
        files = [e for e in files if not e["name"].endswith((".safetensors", ".bin"))]
    if not files:
        raise UserError(f"no such checkpoint: {url}")
    return sorted(files, key=lambda e: e["name"])


def _version(files: list[dict[str, Any]]) -> list | None:
    """What identifies these bytes: each file's name, size and version fields; None when the
    store reports none for some file (same sizes would then look like the same checkpoint)."""
    out = []
    for e in files:
        fields = {k: e[k] for k in VERSION_FIELDS if e.get(k) not in (None, "")}
        if not fields:
            return None
        out.append([e["name"].rsplit("/", 1)[-1], int(e.get("size") or 0), fields])
    return out


def _download(fs, files: list[dict[str, Any]], dest: str) -> None:
    names = [e["name"].rsplit("/", 1)[-1] for e in files]
    fs.get([e["name"] for e in files], [os.path.join(dest, n) for n in names])  # in parallel on async stores
    for e, n in zip(files, names):
        size = os.path.getsize(os.path.join(dest, n))
        if e.get("size") is not None and size != int(e["size"]):
            raise OSError(f"copying {e['name']} gave {size} bytes, not {e['size']}")


@contextlib.contextmanager
def private_copy(fs, path: str, url: str, *, weights: bool = True) -> Iterator[str]:
    """A temporary local copy of `url`, removed on exit (a source that cannot be cached)."""
    files = _listing(fs, path, url, weights)
    dest = tempfile.mkdtemp(prefix="moe2dense-src-")
    try:
        _download(fs, files, dest)
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _slug(url: str) -> str:
    base = url.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:48] or "checkpoint"


def _try_evict(root: str, entry: str) -> bool:
    """Delete the entry unless someone uses or fills it; renamed aside first, so that a kill
    during the deletion leaves garbage under a name no reader takes for a complete copy."""
    fd = os.open(os.path.join(root, f".{entry}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        doomed = os.path.join(root, f"{entry}.evict-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(os.path.join(root, entry), doomed)
        except FileNotFoundError:
            return True
        shutil.rmtree(doomed, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def _clean_garbage(root: str, mine: str) -> None:
    """Remove what killed fillers and evictors left, where nobody is at work on it (`mine`:
    the entry whose lock this process holds)."""
    for name in os.listdir(root):
        m = _GARBAGE.match(name)
        if not m:
            continue
        if m["entry"] == mine:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            continue
        fd = os.open(os.path.join(root, f".{m['entry']}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        finally:
            os.close(fd)


def _entries(root: str) -> list[str]:
    return [n for n in os.listdir(root) if not n.startswith(".") and not _GARBAGE.match(n)
            and os.path.isdir(os.path.join(root, n))]


def _last_use(root: str, entry: str) -> float:
    try:
        return os.path.getmtime(os.path.join(root, f".{entry}.lock"))
    except FileNotFoundError:
        return 0.0


def _make_room(root: str, need: int, url: str, keep: str) -> None:
    """Evict unused entries, least recently used first, until `need` bytes fit."""
    if shutil.disk_usage(root).free >= need * _HEADROOM:
        return
    for entry in sorted((e for e in _entries(root) if e != keep), key=lambda e: _last_use(root, e)):
        _try_evict(root, entry)
        if shutil.disk_usage(root).free >= need * _HEADROOM:
            return
    free = shutil.disk_usage(root).free
    raise UserError(f"{url} needs {need / 1e9:.1f} GB on local disk and {root} has {free / 1e9:.1f} GB free "
                    f"(other cached checkpoints are in use); set {CACHE_ENV} to a larger disk")


@contextlib.contextmanager
def cached_copy(fs, path: str, url: str, *, weights: bool = True, root: str | None = None) -> Iterator[str]:
    """The node's complete local copy of the checkpoint at `url`, made at most once per node
    and version, and held (no one evicts it) while the block runs. See the module docstring."""
    files = _listing(fs, path, url, weights)
    version = _version(files)
    if version is None:
        with private_copy(fs, path, url, weights=weights) as local:
            yield local
        return
    root = root or cache_root()
    os.makedirs(root, exist_ok=True)
    source = _digest([url, weights])
    entry = f"{_slug(url)}-{source}-{_digest(version)}"
    local = os.path.join(root, entry)
    lock = os.path.join(root, f".{entry}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.path.isdir(local):
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for an evictor, which may have taken it
        if not os.path.isdir(local):  # filled exclusively: the replicas of a node download once
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not os.path.isdir(local):  # not filled by the one that held the lock before
                _fill(fs, path, url, files, weights, root, entry)
            fcntl.flock(fd, fcntl.LOCK_SH)
        os.utime(lock)
        yield local
    finally:
        os.close(fd)  # drops the lock


def _fill(fs, path: str, url: str, files: list[dict[str, Any]], weights: bool, root: str, entry: str) -> None:
    _clean_garbage(root, mine=entry)
    source = entry.rsplit("-", 2)[-2]
    for other in _entries(root):  # older versions of this source: what it was, not what it is
        if other != entry and other.rsplit("-", 2)[-2] == source:
            _try_evict(root, other)
    _make_room(root, sum(int(e.get("size") or 0) for e in files), url, keep=entry)
    tmp = os.path.join(root, f"{entry}.partial-{uuid.uuid4().hex[:8]}")
    try:
        _download(fs, files, tmp)
        if _version(_listing(fs, path, url, weights)) != _version(files):
            raise UserError(f"{url} changed while it was being copied; run again once it is complete")
        os.rename(tmp, os.path.join(root, entry))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["cached_copy", "private_copy", "cache_root", "CACHE_ENV"]
