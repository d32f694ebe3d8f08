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

Object stores (s3://, gs://) have no directories, no rename and no lock, so there the rules hold
in the sense that is possible:

- every object is written whole (a reader never sees half an object), and a file output (a
  plan, eval results) is replaced by one server-side copy, so it is the old file or the new one;
- a directory output is written under `NAME.partial-*` as before. It is committed by one small
  object, `NAME.commit-*`, listing its files, written only once all of them are; then each file
  is copied over NAME, files of the old output that the new one lacks are deleted, and the
  partial copy and the record are deleted. A kill before the record leaves the old output; a
  kill after it leaves a replacement that the next run writing NAME (or checking it as an
  output) finishes before anything else, so NAME ends as the new output, whole. While a
  replacement is in flight (or pending after a kill) a reader of NAME may see files of both. A
  `NAME.old-*` with NAME missing (which earlier versions left there) is copied back the same way;
- there is no lock: one run at a time per destination is up to the user, and a second writer
  may delete the first one's `NAME.partial-*`;
- a bucket that does not exist is refused before any work, and every URL opened gets a fresh
  view of the store (s3fs and gcsfs cache listings; other processes, Ray workers among them,
  write there).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import math
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

PARTIAL, OLD, COMMIT = ".partial-", ".old-", ".commit-"

# Protocols whose filesystems come with `pip install 'moe2dense-ray[cloud]'`.
CLOUD_PROTOCOLS = ("s3", "s3a", "gs", "gcs")


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a local path or fsspec URL.

    fsspec hands out one cached instance per store and s3fs/gcsfs cache directory listings in
    it, so a listing made before a Ray worker (or another run) wrote would hide what it wrote:
    every URL opened here starts from a fresh view of the store."""
    try:
        fs, path = fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs: fsspec says what to install
        hint = ""
        if str(url).split("://", 1)[0].rsplit("::", 1)[-1] in CLOUD_PROTOCOLS:
            hint = " (pip install 'moe2dense-ray[cloud]' installs s3fs and gcsfs)"
        raise UserError(f"cannot open {url}: {' '.join(str(e).split())}{hint}") from None
    if not is_local(fs):
        fs.invalidate_cache()
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
    if not is_local(fs):  # no lock there, so nothing to wait for: NAME is first made what a killed run left it to be
        _check_bucket(fs, path, url)
        settle(fs, path)
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


def _check_bucket(fs, path: str, url: str) -> None:
    """A store writes into a bucket that must exist: without one, the first upload (at the end
    of a long run) would fail."""
    bucket = path.split("/", 1)[0]
    if bucket and "/" in path and not fs.exists(bucket):
        raise UserError(f"cannot write {url}: the bucket {bucket} does not exist, or cannot be reached with "
                        f"these credentials")


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
        if fs.isfile(tmp):
            fs.copy(tmp, dest)  # one object, replaced whole by the store
            fs.rm(tmp)
        else:
            _commit(fs, tmp, dest)
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


def _journal(dest: str, src: str) -> str:
    """The commit record of moving `src` (NAME.partial-X or NAME.old-X) to `dest`: NAME.commit-X."""
    return f"{dest}{COMMIT}{src.rsplit('-', 1)[1]}"


def _commit(fs, tmp: str, dest: str) -> None:
    """Replace the directory `dest` on an object store by the complete `tmp` (module docstring).

    The record, one object written whole, is the commit point: before it nothing at `dest` has
    changed; after it the replacement only goes forward (`_roll_forward`), now or in the next run."""
    files = {p[len(tmp) + 1:]: int(info.get("size") or 0) for p, info in fs.find(tmp, detail=True).items()}
    journal = _journal(dest, tmp)
    fs.pipe_file(journal, json.dumps({"from": posixpath.basename(tmp), "files": files}).encode())
    _roll_forward(fs, journal, dest)


def _roll_forward(fs, journal: str, dest: str) -> None:
    """Finish the replacement that `journal` committed; idempotent, so a kill anywhere in it is
    finished by running it again."""
    record = parse_json(read_small(fs, journal), journal)
    tmp = f"{posixpath.dirname(journal)}/{record['from']}"
    files: dict[str, int] = record["files"]
    staged = {p[len(tmp) + 1:] for p in fs.find(tmp)} if fs.exists(tmp) else set()
    present = {p[len(dest) + 1:]: int(info.get("size") or 0) for p, info in fs.find(dest, detail=True).items()} \
        if fs.exists(dest) else {}
    lost = [f for f in files if f not in staged and present.get(f) != files[f]]
    if lost:  # only deleting `tmp` by hand gets here: never guess which output NAME should be
        raise UserError(f"cannot finish replacing {dest}: {lost[0]} is neither in {tmp} nor at {dest}; "
                        f"remove {journal} and check {dest} by hand")
    todo = sorted(f for f in files if f in staged)
    if todo:  # server-side copies, in parallel
        fs.copy([f"{tmp}/{f}" for f in todo], [f"{dest}/{f}" for f in todo])
    stale = sorted(f"{dest}/{f}" for f in present if f not in files)
    if stale:
        fs.rm(stale)
    if staged:
        fs.rm(tmp, recursive=True)
    fs.rm(journal)
    fs.invalidate_cache()


def settle(fs: fsspec.AbstractFileSystem, dest: str) -> list[str]:
    """Make `dest` the output that killed runs left it to be: a committed replacement (object
    stores) is finished, and an old output renamed aside with `dest` missing is moved back.
    Returns the leftovers it used up."""
    done = []
    for full, kind in _leftovers(fs, dest):
        if kind == COMMIT:
            _roll_forward(fs, full, dest)
            done.append(full)
    for full, kind in _leftovers(fs, dest):
        if kind == OLD and not fs.exists(dest):
            if is_local(fs):
                os.rename(full, dest)
            else:  # copied back under a commit record too: a kill halfway must not lose it
                _commit(fs, full, dest)
            done.append(full)
    return done


def _leftovers(fs, dest: str) -> list[tuple[str, str]]:
    """(path, kind) of what moe2dense itself names beside `dest`: `NAME.partial-X`,
    `NAME.old-X` and `NAME.commit-X`, X eight hex digits, and nothing else."""
    parent, name = posixpath.split(dest) if not is_local(fs) else os.path.split(dest)
    try:
        siblings = fs.ls(parent, detail=False) if fs.exists(parent) else []
    except FileNotFoundError:
        return []
    ours = re.compile(re.escape(name) + r"(\.(?:partial|old|commit)-)[0-9a-f]{8}$")
    found = []
    for base in sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in siblings):
        m = ours.match(base)
        if m:
            found.append((f"{parent}/{base}", m.group(1)))
    return found


def clean_leftovers(fs: fsspec.AbstractFileSystem, dest: str) -> list[str]:
    """Remove what killed runs left beside `dest`; call only while holding its OutputLock.

    First `settle`: a committed replacement (object stores) is finished, and a `dest.old-*`
    with `dest` missing, an old output whose replacement was interrupted between its two
    renames, is moved back rather than deleted. Then the rest is deleted.
    """
    found = settle(fs, dest)
    for full, kind in _leftovers(fs, dest):
        if kind != COMMIT:  # a commit record is left only by a replacement that cannot be finished
            _remove(fs, full)
            found.append(full)
    return found


def discard(fs: fsspec.AbstractFileSystem, tmp: str) -> None:
    """Delete a run's unfinished output `tmp` (after a failure), unless it is committed: then it
    is what the next run finishes the replacement from (`_commit`), and deleting it would lose
    the new output after the old one began to be overwritten."""
    if not is_local(fs) and fs.exists(_journal(tmp.rsplit(PARTIAL, 1)[0], tmp)):
        return
    if fs.exists(tmp):
        _remove(fs, tmp)


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
        discard(fs, tmp)


def finite_json(obj: Any, loc: str = "") -> tuple[Any, list[tuple[str, float]]]:
    """`obj` with every NaN or infinity replaced by None (JSON's null: strict JSON has no NaN), and
    where each was (`a.b[2]`) with its value, so that a result file can say what it could not hold."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [(loc or "value", obj)]
    if isinstance(obj, dict):
        out, where = {}, []
        for k, v in obj.items():
            out[k], w = finite_json(v, f"{loc}.{k}" if loc else str(k))
            where += w
        return out, where
    if isinstance(obj, (list, tuple)):
        pairs = [finite_json(v, f"{loc}[{i}]") for i, v in enumerate(obj)]
        return [v for v, _ in pairs], [w for _, ws in pairs for w in ws]
    return obj, []


def noted_finite(result: dict[str, Any]) -> dict[str, Any]:
    """A result for a JSON file: every non-finite value as null, and a `notes` line for each."""
    out, where = finite_json(result)
    if where:
        out["notes"] = [*out.get("notes", []),
                        *(f"{loc} was {value}, not a finite number: written as null" for loc, value in where)]
    return out


def first_nonfinite_json(obj: Any, loc: tuple = ()) -> tuple[tuple, float] | None:
    """Where the first NaN or infinity in parsed JSON is (json.loads accepts NaN and Infinity)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (loc, obj)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        found = first_nonfinite_json(value, (*loc, key))
        if found is not None:
            return found
    return None
