"""Writing files so that nothing is lost: a temporary file beside the target, renamed into place.

Every file the workbench writes (result JSON, weights, checkpoints, tables, reports) goes through
:func:`atomic_path` or :func:`write_atomic`. The previous version of the file stays intact until the
new one is complete, so a full disk, a crash or a Ctrl-C never leaves a truncated file behind; the
temporary file is removed on failure. A full disk is reported as ``OSError`` saying "No space left on
device" and naming the file.
"""
from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_atomic", "DiskFullError"]


class DiskFullError(OSError):
    """Writing a file failed because the disk (or quota) is full; the previous version is untouched."""


def _full_disk(error: OSError, path: Path) -> OSError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            error.errno, f"No space left on device while writing {str(path)!r}; the previous version (if any) "
            "is untouched — free some space and run it again"
        )
    return error


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _create_beside(path: Path) -> Path:
    """A new, empty file next to ``path`` (same folder, so the rename is atomic), honouring the umask."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            handle = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(handle)
        return candidate
    raise FileExistsError(f"could not create a temporary file beside {str(path)!r}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; when the block succeeds it is renamed onto ``path``.

    Use it with writers that want a file name (``safetensors.save_file``, ``torch.save``, nbconvert).
    On any error the temporary file is removed and ``path`` keeps its previous content; a full disk
    raises :class:`DiskFullError` ("No space left on device ...").

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "table.md"
        >>> with atomic_path(target) as temporary:
        ...     _ = temporary.write_text("| a |\\n")
        >>> target.read_text()
        '| a |\\n'
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = _create_beside(path)
    except OSError as error:
        raise _full_disk(error, path) from error
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        if path.exists():  # a rewrite keeps the target's permissions
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except OSError as error:
        raise _full_disk(error, path) from error
    finally:
        if temporary.exists():
            temporary.unlink()


def write_atomic(path: str | os.PathLike, data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` through a temporary file and a rename; returns the path.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "result.json"
        >>> write_atomic(target, '{"a": 1}').read_text()
        '{"a": 1}'
    """
    path = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(payload)
    return path
