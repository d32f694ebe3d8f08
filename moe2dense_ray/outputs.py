"""Where outputs go, and the guarantees every stage gives about them.

Every stage that writes (calibrate, plan, build, convert, distill, teacher-logits) goes through
this module, so the rules are stated once:

- an output never equals, contains or lies inside one of the run's inputs (SRC, DATA, STATS,
  PLAN...), locally, through symlinks, or as the same URL: replacing it would destroy the input;
- `--overwrite` replaces only an output of the same kind (a checkpoint with `config.json`, a
  statistics directory with `meta.json`, a file that parses as a plan), never someone's files;
- a replaced output is swapped in whole: on Linux the new and old directories are exchanged in
  one `renameat2(RENAME_EXCHANGE)`, so a kill at any instant leaves the old output or the new
  one at the destination; elsewhere the old one is first renamed aside to `NAME.old-*`, which the
  next run moves back if it finds the destination missing;
- only one run writes a destination at a time (an exclusive `flock` on `.NAME.lock` beside it,
  which the kernel drops when the process dies, so a killed run never blocks the next);
- leftovers of killed runs (`NAME.partial-*`, `NAME.old-*`) are removed by the next run that
  holds the lock; nothing else is ever deleted;
- small metadata files (configs, indexes, plans, statistics meta, tokenizer files) are read with
  a size cap and must be regular files, so a symlink to `/dev/zero` cannot hang a stage.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import posixpath
import re
import stat
import uuid
from typing import Any

import fsspec

from .errors import UserError

# tokenizer.json of a 250k-token vocabulary is ~20 MB; nothing that is metadata comes near this
SMALL_FILE_LIMIT = 64 << 20

# What marks a directory as a moe2dense output that --overwrite may replace.
OUTPUT_MARKERS = {"checkpoint": ("config.json", "moe2dense_plan.json"), "statistics": ("meta.json",),
                  "logits": ("stream.json",), "run": ("distill.yaml",), "sweep": ("sweep.yaml",)}

PARTIAL, OLD = ".partial-", ".old-"


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs: fsspec says what to install
        raise UserError(f"cannot open {url}: {' '.join(str(e).split())}") from None
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is the local filesystem (where paths can go to os.* and transformers)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


# -- reading small files ----------------------------------------------------------------------
def read_small(fs: fsspec.AbstractFileSystem, path: str, *, what: str | None = None,
               limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The bytes of a metadata file, refusing devices, FIFOs and anything over `limit` bytes."""
    name = what or path
    if is_local(fs):
        try:
            st = os.stat(path)  # follows symlinks: a link to /dev/zero is a character device
        except FileNotFoundError:
            raise UserError(f"{name} does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{name} is not a regular file")
        size = st.st_size
    else:
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise UserError(f"{name} does not exist") from None
    if size is not None and size > limit:
        raise UserError(f"{name} is {size} bytes, more than a metadata file may be ({limit >> 20} MiB)")
    with fs.open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{name} is larger than a metadata file may be ({limit >> 20} MiB)")
    return data


def read_json(fs: fsspec.AbstractFileSystem, path: str, *, what: str | None = None,
              kind: type = dict) -> Any:
    """A small JSON file's contents, or one UserError line saying what is wrong with it."""
    return parse_json(read_small(fs, path, what=what), what or path, kind=kind)


def parse_json(data: str | bytes, where: str, *, kind: type = dict) -> Any:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where} is not valid JSON ({getattr(e, 'msg', None) or e.reason})") from None
    if not isinstance(obj, kind):
        raise UserError(f"{where} holds a JSON {type(obj).__name__}, not {'an object' if kind is dict else kind.__name__}")
    return obj


def check_small_files(directory: str, names: tuple[str, ...] | list[str]) -> None:
    """Check the metadata files of a local directory before a library (transformers) reads them
    without limits: each present name must be a regular file of bounded size."""
    for name in names:
        path = os.path.join(directory, name)
        if os.path.lexists(path):
            if not os.path.exists(path):
                raise UserError(f"{path} is a dangling symlink")
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{path} is not a regular file")
            if st.st_size > SMALL_FILE_LIMIT:
                raise UserError(f"{path} is {st.st_size} bytes, more than a metadata file may be "
                                f"({SMALL_FILE_LIMIT >> 20} MiB)")


# -- where an output may go ---------------------------------------------------------------------
# Files (not directories) an output of a kind may replace: a JSON object with these keys.
FILE_MARKERS = {"plan": ("version", "layers", "scoring"), "results": ("model", "tasks", "perplexity", "config")}


def _location(url: str) -> tuple[str, str]:
    """(filesystem, path) in a form where equal means the same place and prefix means inside:
    local paths fully resolved (symlinks, `..`, `file://`), URLs with their protocol."""
    url = str(url).rsplit("::", 1)[-1]  # a chained URL (simplecache::s3://...) is stored at its last part
    if "://" not in url:
        url = os.path.expanduser(url)
    fs, path = url_to_fs(url)
    if is_local(fs):
        return "file", os.path.realpath(path)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto, path.rstrip("/")


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _input_location(src: str) -> tuple[str, str] | None:
    if not src or src.startswith("hf:"):  # a hub dataset is not a place on any filesystem here
        return None
    glob = min((src.find(c) for c in "*?[" if c in src), default=-1)
    if glob >= 0:  # a glob of data files: the directory it searches
        src = src[:glob].rsplit("/", 1)[0] or "/"
    return _location(src)


def check_output(url: str, *, what: str, overwrite: bool, sources: tuple[str | None, ...] = ()) -> None:
    """Refuse an output location before any work is done, rather than fail (or destroy) at the end.

    `sources` are every input of the run; `what` is the kind of output (OUTPUT_MARKERS for
    directories, FILE_MARKERS for files). See the module docstring for the rules.
    """
    if not str(url).strip():
        raise UserError("--out is empty")
    fs, path = url_to_fs(url)
    where = _location(url)
    if where[0] == "file" and _inside(os.getcwd(), where[1]):
        raise UserError(f"--out {url} is or contains the current directory: write the {what} somewhere else")
    for src in sources:
        loc = _input_location(src) if src else None
        if loc is None or loc[0] != where[0]:
            continue
        if where[1] == loc[1]:
            raise UserError(f"--out {url} is the input {src}: write the {what} somewhere else")
        if _inside(loc[1], where[1]):
            raise UserError(f"--out {url} contains the input {src}: replacing it would delete the input; "
                            f"write the {what} somewhere else")
        if _inside(where[1], loc[1]):
            raise UserError(f"--out {url} lies inside the input {src}: write the {what} somewhere else")
    if is_local(fs) and os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"--out {url} is a symlink to {os.readlink(path)}, which does not exist")
    if what in FILE_MARKERS:
        _check_file_output(fs, path, url, what=what, overwrite=overwrite)
    elif fs.exists(path):
        if not fs.isdir(path):
            raise UserError(f"{url} exists and is a file, not a {what} directory")
        if fs.ls(path, detail=False):
            if not overwrite:
                raise UserError(f"{url} already exists (use --overwrite to replace it)")
            markers = OUTPUT_MARKERS[what]
            if not any(fs.exists(f"{path}/{m}") for m in markers):
                raise UserError(f"{url} is not a {what} directory (no {' or '.join(markers)}); "
                                f"refusing to replace it even with --overwrite")
    if is_local(fs):
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UserError(f"cannot write {url}: {parent} is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot write {url}: {parent} is not writable")


def _check_file_output(fs, path: str, url: str, *, what: str, overwrite: bool) -> None:
    if not fs.exists(path):
        return
    if fs.isdir(path):
        raise UserError(f"{url} is a directory, not a {what} file")
    if not overwrite:
        raise UserError(f"{url} already exists (use --overwrite to replace it)")
    keys = FILE_MARKERS[what]
    try:
        obj = json.loads(read_small(fs, path, what=url))
    except (UserError, ValueError):
        obj = None
    if not isinstance(obj, dict) or not all(k in obj for k in keys):
        raise UserError(f"{url} is not a {what} file; refusing to replace it even with --overwrite")


# -- one writer at a time -----------------------------------------------------------------------
_held: dict[str, list] = {}  # resolved destination -> [fd, lock path, depth]


class OutputLock:
    """`with OutputLock(url):` holds the destination's lock (re-entrant within a process).

    A second process asking for the same destination fails at once with a UserError instead of
    waiting or silently replacing the first one's output. Remote destinations (object stores)
    cannot be locked; concurrent writers there are the user's to avoid.
    """

    def __init__(self, url: str):
        fs, path = url_to_fs(url)
        self.key = os.path.realpath(path) if is_local(fs) else None
        self.url = url

    def __enter__(self) -> "OutputLock":
        if self.key is None:
            return self
        held = _held.get(self.key)
        if held:
            held[2] += 1
            return self
        parent, name = os.path.split(self.key)
        os.makedirs(parent, exist_ok=True)
        lock = os.path.join(parent, f".{name}.lock")
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"another run is writing {self.url} right now ({lock} is locked); "
                                f"wait for it to finish or choose another --out") from None
            try:  # the previous holder may have removed the file between our open and lock
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        _held[self.key] = [fd, lock, 1]
        return self

    def __exit__(self, *exc) -> None:
        if self.key is None:
            return
        held = _held[self.key]
        held[2] -= 1
        if held[2] == 0:
            del _held[self.key]
            fd, lock = held[0], held[1]
            try:
                os.unlink(lock)  # while still holding it; a waiter re-checks the inode
            except FileNotFoundError:
                pass
            os.close(fd)


# -- moving a finished output into place ----------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one system call (Linux renameat2); False where that is unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove(fs, path: str) -> None:
    if fs.isdir(path):
        fs.rm(path, recursive=True)
    else:
        fs.rm(path)


def partial_name(dest: str) -> str:
    return f"{dest}{PARTIAL}{uuid.uuid4().hex[:8]}"


def swap_in(fs: fsspec.AbstractFileSystem, tmp: str, dest: str, *, overwrite: bool) -> None:
    """Move the finished output `tmp` to `dest`, replacing an older output only with `overwrite`.

    A kill at any instant leaves the old output or the new one at `dest` (local, Linux), or the old
    one renamed to `dest.old-*`, which the next run restores (elsewhere); see the module docstring.
    """
    exists = os.path.lexists(dest) if is_local(fs) else fs.exists(dest)
    if exists and not overwrite:
        raise UserError(f"{dest} appeared while this run was writing it (use --overwrite to replace it)")
    if not is_local(fs):
        if exists:
            old = f"{dest}{OLD}{uuid.uuid4().hex[:8]}"
            fs.mv(dest, old, recursive=True)
            fs.mv(tmp, dest, recursive=True)
            _remove(fs, old)
        else:
            fs.mv(tmp, dest, recursive=True)
        return
    if not exists:
        os.rename(tmp, dest)
    elif os.path.isfile(tmp) and os.path.isfile(dest):
        os.replace(tmp, dest)  # atomic for files everywhere
    elif _exchange(tmp, dest):  # tmp now holds the old output under its partial name
        _remove(fs, tmp)
    else:
        old = f"{dest}{OLD}{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        _remove(fs, old)


def clean_leftovers(fs: fsspec.AbstractFileSystem, dest: str) -> list[str]:
    """Remove what killed runs left beside `dest`; call only while holding its OutputLock.

    A `dest.old-*` with `dest` missing is an old output whose replacement was interrupted
    between its two renames: it is moved back rather than deleted.
    """
    parent, name = posixpath.split(dest) if not is_local(fs) else os.path.split(dest)
    try:
        siblings = fs.ls(parent, detail=False) if fs.exists(parent) else []
    except FileNotFoundError:
        return []
    found = []
    ours = re.compile(re.escape(name) + r"\.(partial|old)-[0-9a-f]{8}$")  # exactly the names we make
    for p in sorted(siblings, key=lambda p: OLD not in p):  # restore an old output first
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if not ours.match(base):
            continue
        full = f"{parent}/{base}"
        if base.startswith(name + OLD) and not fs.exists(dest):
            fs.mv(full, dest, recursive=True)
        else:
            _remove(fs, full)
        found.append(full)
    return found


def start_directory(url: str, files: dict[str, str | bytes], *, overwrite: bool) -> None:
    """A fresh output directory holding `files` (its settings), swapped in whole over an earlier
    output of the same kind with `overwrite`: for outputs that later stages fill in place (a
    distillation run, a sweep). Call while holding the destination's OutputLock."""
    fs, path = url_to_fs(url)
    clean_leftovers(fs, path)
    tmp = partial_name(path)
    try:
        fs.makedirs(tmp, exist_ok=True)
        for name, data in files.items():
            with fs.open(f"{tmp}/{name}", "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        empty = fs.exists(path) and not fs.ls(path, detail=False)
        swap_in(fs, tmp, path, overwrite=overwrite or empty)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
