"""Putting a finished artifact directory in place: whole or not at all, never over something it should not replace.

The emitter writes everything into a temporary sibling of the output, ``.<name>.partial-<pid>-<random>``,
and only then moves it to the output path. What a user can observe at the output path, at any instant and
whatever kills the compile (an error, SIGINT, SIGKILL, a power cut before the rename):

* without ``--force``: nothing, then the complete new directory. The final move refuses to replace anything
  (``renameat2(RENAME_NOREPLACE)``), so an output that appeared meanwhile is not clobbered either.
* with ``--force`` over an existing output: the complete old directory, then the complete new one. The two
  are swapped in one step (``renameat2(RENAME_EXCHANGE)``) and the old one, now at the temporary name, is
  deleted. Where the kernel or file system cannot exchange, two renames are used and for that instant the path
  is absent (never half-old, half-new); an error between them puts the old output back.
* ``--force`` replaces only a romac artifact directory (one holding ``manifest.json``) or an empty directory,
  never a file, a link or some other directory (``--out . --force`` must not delete a source tree).
* Ctrl-C (SIGINT) deletes the temporary and leaves the path as it was; it is held over the few system calls
  that must not be cut in two (creating and recording the temporary, the renames), see :func:`sigint_deferred`.

A temporary is never mistaken for an output: it has a hidden name (:data:`romac.artifacts.TEMP_NAME`), which
:func:`romac.artifacts.open_artifacts` refuses; its manifest is written last and deleted first. A temporary
left by a killed compile (SIGKILL cannot be caught) is deleted by the next compile to the same path, once the
process named in it is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from romac.spec.manifest import MANIFEST, TEMP_NAME
from romac.errors import RomacError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def temp_prefix(path: Path, kind: str) -> str:
    """The name prefix of this process's temporary siblings of ``path`` (kind: partial or old)."""
    return f".{path.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary siblings of ``path`` whose compile is no longer running; returns them."""
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in sorted(entries):
        m = TEMP_NAME.match(p.name)
        if not m or m.group("name") != path.name or p.is_symlink() or not p.is_dir():
            continue
        if int(m.group("pid")) != os.getpid() and _pid_alive(int(m.group("pid"))):
            continue  # another compile to the same path is still writing it
        remove_tree(p)
        removed.append(p)
    return removed


def check_destination(path: Path, shown: str, force: bool, marker: str = MANIFEST) -> None:
    """Refuse an output path the compile may not write (before any work is done). ``--force`` replaces only an
    empty directory or one of romac's outputs, recognised by its ``marker`` file (an artifact directory's manifest,
    an exported base's romac_base.json)."""
    if not os.path.lexists(path):
        return
    if not force:
        raise RomacError("output already exists", where=shown, hint="pass --force to replace it, or choose another --out")
    if path.is_symlink() or not path.is_dir():
        raise RomacError("output exists and is a file or a symbolic link; --force replaces only an artifact directory",
                         where=shown)
    try:
        empty = not any(path.iterdir())
    except OSError as e:
        raise RomacError(f"cannot read the existing output ({e.strerror})", where=shown) from None
    if not empty and not (path / marker).is_file():
        raise RomacError(
            f"output exists and is not a romac output of this kind (no {marker}); --force replaces only those",
            where=shown,
            hint="remove it yourself, or choose another --out",
        )


@contextlib.contextmanager
def sigint_deferred():
    """Hold Ctrl-C (SIGINT) over a few system calls that must not be cut in two: the KeyboardInterrupt is raised
    when the block is done, never inside it. Only where Python's default handler is in place (the main thread)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def make_temporary(path: Path, shown: str, created: list[Path]) -> Path:
    """Create the temporary sibling (with the permissions a normal mkdir would give, not mkdtemp's 0700).

    It is appended to ``created`` in the same uninterruptible step, so the caller can always clean it up.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sigint_deferred():
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path, "partial"), dir=path.parent))
            created.append(tmp)
    except OSError as e:
        raise RomacError(f"cannot create the output directory ({e.strerror})", where=shown) from None
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where it is unavailable (not Linux, old libc, a file system without support)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def remove_tree(tree: Path) -> None:
    """Delete a directory tree, its manifest first, so that no moment of the deletion looks like an output."""
    try:
        (tree / MANIFEST).unlink()
    except OSError:
        pass
    shutil.rmtree(tree, ignore_errors=True)


def install(tmp: Path, path: Path, shown: str, force: bool, marker: str = MANIFEST) -> None:
    """Move the complete directory ``tmp`` to ``path`` as described in the module docstring.

    The renames run with Ctrl-C held (:func:`sigint_deferred`), so an interrupt never falls between them.
    """
    try:
        if not os.path.lexists(path):
            with sigint_deferred():
                if not _renameat2(tmp, path, _RENAME_NOREPLACE):
                    if os.path.lexists(path):
                        raise FileExistsError(errno.EEXIST, "exists", str(path))
                    os.rename(tmp, path)
            return
        check_destination(path, shown, force, marker)  # again: it may have changed while compiling
        with sigint_deferred():
            exchanged = _renameat2(tmp, path, _RENAME_EXCHANGE)
        if exchanged:
            remove_tree(tmp)  # tmp now holds the old output
            return
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(path, "old"), dir=path.parent))
        try:
            with sigint_deferred():
                os.rename(path, old / "old")
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old / "old", path)  # put the old output back
                    raise
            remove_tree(old / "old")
        finally:
            try:
                os.rmdir(old)  # empty unless putting the old output back failed: then keep it
            except OSError:
                pass
    except FileExistsError:
        raise RomacError("output appeared while compiling; not replaced", where=shown,
                         hint="pass --force to replace it, or choose another --out") from None
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise RomacError("output appeared while compiling; not replaced", where=shown,
                             hint="pass --force to replace it, or choose another --out") from None
        raise RomacError(f"cannot move the finished output into place ({e.strerror})", where=shown) from None
