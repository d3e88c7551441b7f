"""The one way taskvec writes an output: beside it, under a lock, renamed into place when complete.

`atomic_path(out)` yields a hidden temporary path `.NAME.partial-PID` beside `out`. While it is
open, an advisory lock `.NAME.lock` beside `out` keeps other taskvec processes from writing the
same path (they fail at once, naming this process). On success the temporary file or folder is
fsynced and renamed over `out`; on any error it is removed and `out` is left as it was.

`--force` (``overwrite=True``) replaces only what taskvec itself wrote: a folder whose shard
index, bank manifest, composer config or marker file `.taskvec` says taskvec wrote it and which
holds nothing else than the files those list, or a `.safetensors` file whose header metadata names taskvec. Anything
else is refused, naming what is in the way; inside a folder, nested files count too. An output is
also refused when it is an input of the same command (compared by inode, so `./x`, `/abs/x` and a
hard link are the same file), contains one, or is the working folder or one of its parents. A
command run through the CLI records every file it opens for reading (`tracking_inputs`), so no
output of it can replace one of them.

The lock file is opened without following a symbolic link and used only if it is a regular file
with a single link, so a lock name planted as a link to another file never truncates that file.
It records the writer's process id. Temporaries left by a killed taskvec process
(`.NAME.partial-PID`, `.NAME.old-PID`, and the `.NAME.tmp-PID*` names of older versions) are
removed by the next writer of the same path, once it holds the lock, only if the lock file the
killed process left names that PID and the process no longer runs: a user's file or folder that
merely looks like a temporary is never removed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from taskvec.errors import ConfigError, OutputBusyError, OutputError
from taskvec.io.readers import TRACKED, parse_json

MARKER = ".taskvec"
MARKER_FORMAT = "taskvec/output"
PENDING = ".taskvec-pending.json"  # inside a bank: basis files an unfinished `add` may have left
_STALE = re.compile(r"^\.(?P<name>.+)\.(?:partial|old|tmp)-(?P<pid>\d+)(?:\.[A-Za-z0-9]+)?$")


# ---------------------------------------------------------------- what taskvec wrote
def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors header, or None if `path` is not a readable safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > min(100 * 2**20, path.stat().st_size - 8):
                return None
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            header = parse_json(f.read(n))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _is_taskvec_meta(meta: dict[str, str] | None) -> bool:
    return meta is not None and any(str(k).startswith("taskvec") for k in meta)


def _json(path: Path) -> object:
    try:
        if not path.is_file():
            return None
        return parse_json(path.read_bytes(), max_bytes=64 * 2**20)
    except (OSError, ValueError):
        return None


def _owned_entries(folder: Path) -> set[str] | None:
    """Names (relative paths) in `folder` that taskvec wrote, or None if taskvec did not write the folder.

    A name without a '/' that is a folder (a bank's sharded basis) must itself be a folder taskvec wrote."""
    marker = _json(folder / MARKER)
    if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT and isinstance(marker.get("files"), list):
        return {MARKER, *(str(f) for f in marker["files"])}
    manifest = _json(folder / "manifest.json")
    if isinstance(manifest, dict) and manifest.get("format") == "taskvec/bases-bank":
        bases = manifest.get("bases")
        entries = bases if isinstance(bases, list) else []
        pending = _json(folder / PENDING)
        return {
            "manifest.json",
            MARKER,
            *(str(b.get("file", "")) for b in entries if isinstance(b, dict)),
            *((PENDING, *(str(f) for f in pending.get("files", []))) if isinstance(pending, dict) else ()),
        }
    config = _json(folder / "config.json")
    if isinstance(config, dict) and config.get("format") == "taskvec/composer":
        return {"config.json", "coefficients.safetensors"}
    for index in folder.glob("*.index.json"):
        data = _json(index)
        meta = data.get("metadata") if isinstance(data, dict) else None
        if isinstance(data, dict) and isinstance(meta, dict) and _is_taskvec_meta(meta):
            wm = data.get("weight_map")
            try:
                listed = json.loads(meta.get("taskvec_files", "[]"))
            except (TypeError, ValueError, RecursionError):
                listed = []
            names = [*(wm.values() if isinstance(wm, dict) else []), *(listed if isinstance(listed, list) else [])]
            return {index.name, *(str(v) for v in names)}
    return None


def _not_owned(folder: Path, owned: set[str]) -> list[str]:
    """Relative paths under `folder` that `owned` does not cover (nested folders checked too)."""
    extra: list[str] = []
    for p in sorted(folder.iterdir()):
        name = p.name
        nested = {o.split("/", 1)[1] for o in owned if o.startswith(name + "/")}
        if name not in owned and not nested:
            extra.append(name)
        elif p.is_dir() and not p.is_symlink():
            if nested:  # the record lists the files inside: each one must be listed
                extra += [f"{name}/{x}" for x in _not_owned(p, nested)]
            else:  # a folder listed by name: taskvec must have written it too
                sub = _owned_entries(p)
                extra += [f"{name}/"] if sub is None else [f"{name}/{x}" for x in _not_owned(p, sub)]
    return extra


def written_by_taskvec(path: Path) -> str | None:
    """None if taskvec wrote `path` and nothing else is in it; otherwise why it is not taskvec's to replace."""
    if path.is_symlink():
        return "is a symbolic link"
    if path.is_dir():
        owned = _owned_entries(path)
        if owned is None:
            return "is a folder that taskvec did not write"
        extra = _not_owned(path, owned)
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            return f"holds files that taskvec did not write ({shown})"
        return None
    if path.suffix == ".safetensors" and _is_taskvec_meta(_safetensors_metadata(path)):
        return None
    return "is a file that taskvec did not write"


def _inside(a: Path, b: Path) -> bool:
    """Whether `a` is `b` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _input_conflict(
    out: Path, real: Path, inputs: list[str | os.PathLike[str]], against_read: bool = True
) -> str | None:
    """The input that `out` is (by inode or path), contains or lies inside, else None."""
    tracked = TRACKED[-1] if TRACKED and against_read else {}
    for given in [*inputs, *tracked.values()]:
        inp = Path(given).resolve()
        if _inside(inp, real) or _inside(real, inp) or _same_file(out, Path(given)):
            return str(given)
    if out.exists() and tracked:
        paths = [out] if not out.is_dir() else [p for p in out.rglob("*") if p.is_file()][:100_000]
        for q in paths:
            try:
                st = q.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in tracked:
                return tracked[(st.st_dev, st.st_ino)]
    return None


def check_output(
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    owned: Callable[[Path], str | None] = written_by_taskvec,
    against_read: bool = True,
) -> Path:
    """Refuse an output path taskvec must not write: an input, the working folder, an existing
    path without `overwrite`, or one that taskvec did not write. Returns it as a Path.

    `inputs` are the files the caller reads; with `against_read` (the default) so is every file
    the running command has read (`tracking_inputs`); taskvec's own state files that it reads and
    rewrites (a bank's manifest, a cache) pass `against_read=False`."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise ConfigError(f"{out}: the output must be a new file or folder name, not {str(out)!r}")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, real):
        raise ConfigError(f"{out}: is the working folder or one of its parents; choose a new output name")
    clash = _input_conflict(out, real, [i for i in inputs if i is not None], against_read)
    if clash is not None:
        raise ConfigError(f"{out}: is (or contains, or lies inside) the input {clash}; choose another output")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ConfigError(f"{out}: already exists (pass overwrite/--force to replace it)")
        why = owned(out)
        if why is not None:
            raise ConfigError(
                f"{out}: {why}; --force replaces only outputs taskvec wrote, so nothing was changed "
                "(move it away or choose another output)"
            )
    return out


# ---------------------------------------------------------------- locks
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_lock(out: Path, lock: Path) -> int:
    """Open the lock file without following a link; refused unless a regular file with one link."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(lock, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(
                f"{out}: the lock file {lock.name} is a symbolic link, not taskvec's; refused (remove it and retry)"
            ) from None
        raise OutputError(f"{out}: cannot create the lock file {lock.name} ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else f"has {st.st_nlink} hard links"
        raise OutputError(f"{out}: the lock file {lock.name} {what}, not taskvec's; refused (remove it and retry)")
    return fd


def _recorded_pids(fd: int) -> list[int]:
    """The process ids a lock file records: its holder first, then writers killed before it."""
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    return [int(w) for w in text.split() if w.isdigit()]


@contextmanager
def path_lock(out: Path, what: str = "written") -> Iterator[None]:
    """Hold the advisory lock `.NAME.lock` beside `out`; fail at once if another process holds it.

    The lock records this process's id; temporaries of `out` that killed writers left (named by
    the ids the lock file they left records) are removed once the lock is held."""
    where = Path(os.path.abspath(out))
    lock = where.parent / f".{where.name}.lock"
    while True:
        fd = _open_lock(Path(out), lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pids = _recorded_pids(fd)
            finally:
                os.close(fd)
            holder = str(pids[0]) if pids else "unknown"
            raise OutputBusyError(
                f"{out}: is being {what} by another taskvec process (pid {holder}); wait for it to finish"
            ) from None
        try:  # the holder before us may have removed the lock file after we opened it: lock the current one
            st = os.stat(lock, follow_symlinks=False)
            same = st.st_ino == os.fstat(fd).st_ino and st.st_nlink == 1
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        killed = [p for p in _recorded_pids(fd) if p != os.getpid()]
        os.ftruncate(fd, 0)
        os.pwrite(fd, " ".join(map(str, [os.getpid(), *killed])).encode() + b"\n", 0)
        left = remove_stale(where, killed)
        os.ftruncate(fd, 0)
        os.pwrite(fd, " ".join(map(str, [os.getpid(), *left])).encode() + b"\n", 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


# ---------------------------------------------------------------- stale temporaries
def _remove(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p)


def remove_stale(out: Path, pids: Iterable[int]) -> list[int]:
    """Remove the temporaries that killed taskvec processes `pids` (recorded by the lock file they
    left) left beside `out`, if those processes are gone; returns the ids whose temporaries remain.

    A `.NAME.old-PID` (the previous output, moved aside just before its replacement was renamed in)
    is put back if `out` itself is missing, so an interrupted replacement never loses the old output.
    """
    dead = {p for p in pids if not _pid_alive(p)}
    left = {p for p in pids if p not in dead}
    if not dead:
        return sorted(left)
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return sorted(left | dead)
    for p in entries:
        m = _STALE.match(p.name)
        if not m or m["name"] != out.name or int(m["pid"]) not in dead:
            continue
        try:
            if ".old-" in p.name and not (out.exists() or out.is_symlink()):
                os.replace(p, out)
                continue
            _remove(p)
        except OSError:
            left.add(int(m["pid"]))
    return sorted(left)


# ---------------------------------------------------------------- the writer
def _fsync_tree(path: Path) -> None:
    paths = [path] if not path.is_dir() else [*(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_marker(folder: Path) -> None:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != MARKER)
    (folder / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "files": files}, indent=1) + "\n")


def _as_output_error(e: OSError, out: Path, tmp: Path | None = None) -> OutputError:
    if isinstance(e, OutputError):  # from a writer nested in this one: name our output, not our temporary
        return OutputError(str(e).replace(str(tmp), str(out))) if tmp is not None else e
    where = e.filename if e.filename and not str(e.filename).startswith(str(out.parent / f".{out.name}.")) else out
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return OutputError(f"{where}: cannot write ({reason}); nothing was changed")


@contextmanager
def atomic_path(
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    folder: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    marker: bool = True,
    owned: Callable[[Path], str | None] = written_by_taskvec,
    against_read: bool = True,
) -> Iterator[Path]:
    """Yield a temporary path beside `out` to write; on success it replaces `out`, on error it is removed.

    `folder=True` creates the temporary as an empty folder (and, with `marker`, records in it the
    files it holds when done, which is what lets `--force` replace it later); otherwise the caller
    creates the file. OS errors (read-only folder, disk full, a parent that is a file) become an
    `OutputError` naming the path. The lock is held and the overwrite rule checked again just
    before the rename.
    """
    inputs = list(inputs)
    out = check_output(out, overwrite=overwrite, inputs=inputs, owned=owned, against_read=against_read)
    for parent in Path(os.path.abspath(out)).parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputError(f"{out}: cannot write, {parent} is a file, not a folder")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _as_output_error(e, out) from None
    if not out.parent.is_dir():
        raise OutputError(f"{out}: cannot write, its parent {out.parent} is not a folder")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    with path_lock(out):
        try:
            check_output(out, overwrite=overwrite, inputs=inputs, owned=owned, against_read=against_read)
            if tmp.exists() or tmp.is_symlink():
                _remove(tmp)
            if folder:
                tmp.mkdir()
            yield tmp
            if not (tmp.exists() or tmp.is_symlink()):
                raise OutputError(f"{out}: nothing was written")
            if folder and marker:
                _write_marker(tmp)
            _fsync_tree(tmp)
            check_output(out, overwrite=overwrite, inputs=inputs, owned=owned, against_read=against_read)
            _replace(tmp, out)
            _fsync_dir(out.parent)
        except OSError as e:
            raise _as_output_error(e, out, tmp) from None
        finally:
            if tmp.exists() or tmp.is_symlink():
                _remove(tmp)


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` over `out`; a previous folder (or a file replaced by a folder) is moved aside first."""
    if not (out.is_dir() and not out.is_symlink()) and not tmp.is_dir():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists() or old.is_symlink():
        _remove(old)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` through `atomic_path`, replacing a previous version of it (a state
    file of taskvec's own, such as a bank manifest, which the same command may have read)."""
    with atomic_path(path, overwrite=True, owned=lambda p: None, against_read=False) as tmp:
        tmp.write_text(text)
