"""Small C kernels, built at first use with the system's C compiler and loaded with ctypes.

A kernel is a C file shipped in the package. `load(source)` compiles it once per source text,
compiler and platform into `$TASKVEC_CACHE/kernels` (default ~/.cache/taskvec/kernels) and
returns the library, or None when there is no C compiler, the build fails, or the environment
sets TASKVEC_NATIVE=0: callers then run torch operations that give the same results, only more
slowly. ctypes releases the interpreter lock during a call, so several threads run kernels at once.

`CC` names the compiler (default `cc`). The library is written to a temporary file and renamed
into place, so processes that build it at the same time never load a half-written one. Each
load marks the library as used; builds of the same C file that no process has loaded for
`STALE_DAYS` (left by older versions of taskvec) are removed when a new one is built.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from taskvec.paths import default_cache

FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off"]
BUILD_TIMEOUT_S = 120
STALE_DAYS = 30

_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL | None] = {}
_paths: dict[Path, Path] = {}  # the file each loaded library came from


def enabled() -> bool:
    """Whether compiled kernels may be used (TASKVEC_NATIVE=0 turns them off)."""
    return os.environ.get("TASKVEC_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> list[str] | None:
    """The C compiler command ($CC, else cc), or None when it is not installed."""
    cmd = shlex.split(os.environ.get("CC") or "cc")
    if not cmd or shutil.which(cmd[0]) is None:
        return None
    return cmd


def load(source: Path) -> ctypes.CDLL | None:
    """The compiled library of C file `source` (built on first use), or None (see the module)."""
    if not enabled():
        return None
    source = Path(source)
    with _lock:
        if source not in _loaded:
            _loaded[source] = _build_and_load(source)
        return _loaded[source]


def _build_and_load(source: Path) -> ctypes.CDLL | None:
    cc = compiler()
    if cc is None or os.name != "posix":
        return None
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    text = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [text, " ".join(cc + FLAGS).encode(), version.encode(), platform.machine().encode(), sys.platform.encode()]
        )
    ).hexdigest()[:16]
    folder = default_cache() / "kernels"
    lib = folder / f"{source.stem}-{key}.so"
    if not lib.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{lib.name}.tmp-{os.getpid()}-{threading.get_ident()}"
            run = subprocess.run(
                [*cc, *FLAGS, "-o", str(tmp), str(source), "-lm"],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
            if run.returncode != 0:
                tmp.unlink(missing_ok=True)
                warnings.warn(
                    f"taskvec: building {source.name} with {' '.join(cc)} failed, merges run on torch operations "
                    f"(slower): {run.stderr.strip()[-500:]}",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return None
            os.replace(tmp, lib)
            _prune(folder, source.stem, keep=lib)
        except (OSError, subprocess.SubprocessError) as e:
            warnings.warn(
                f"taskvec: cannot build {source.name} into {folder} ({e}); merges run on torch operations (slower)",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
    try:
        loaded = ctypes.CDLL(str(lib))
        _paths[source] = lib
        with contextlib.suppress(OSError):
            os.utime(lib)  # used now: not stale
        return loaded
    except OSError as e:
        warnings.warn(
            f"taskvec: cannot load {lib} ({e}); merges run on torch operations (slower)", RuntimeWarning, stacklevel=4
        )
        return None


def _prune(folder: Path, stem: str, keep: Path) -> None:
    """Remove the builds of `stem` (`STEM-<16 hex>.so`, the names `load` gives) other than `keep`
    that no process has loaded for `STALE_DAYS`; nothing else in the folder is touched."""
    name = re.compile(re.escape(stem) + r"-[0-9a-f]{16}\.so")
    limit = time.time() - STALE_DAYS * 86400
    for path in folder.iterdir():
        if path != keep and name.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < limit:
                    path.unlink()


def describe(source: Path) -> str:
    """In a few words, whether the kernels of C file `source` are in use here, and why not."""
    if not enabled():
        return "off (TASKVEC_NATIVE=0)"
    if load(source) is not None:
        return f"built ({_paths.get(Path(source), '?')})"
    if compiler() is None or os.name != "posix":
        return "not built: no C compiler (cc, or $CC); torch operations run instead"
    return "not built: the build failed (see the warning); torch operations run instead"
