"""Result files of the commands: checked before a run, written atomically, never overwritten silently.

``--out PREFIX`` names a family of files ``PREFIX.md``, ``PREFIX.json``, ... : the suffix is
*appended* (``exp.1`` -> ``exp.1.md``, never ``exp.md``).  :func:`check_outputs` runs before any
work, so a bad or taken ``--out`` is refused at once rather than after an hour of work;
:func:`write_outputs` writes each file to a temporary file beside it and moves it into place
(``os.replace``), so a reader or a crash never sees half a file.  Without ``overwrite`` a file that
exists is refused, also when it appears while the run was going (a second run to the same prefix);
with ``overwrite`` a symbolic link is replaced by the new file, never written through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from ttq.errors import ConfigError, OutputExistsError

logger = logging.getLogger(__name__)


def output_paths(prefix: str | os.PathLike, suffixes: Iterable[str]) -> dict[str, Path]:
    """``{suffix: PREFIX + suffix}``; the suffix is appended, not substituted for an existing one."""
    text = os.fspath(prefix)
    if not text or text.endswith(("/", os.sep)) or Path(text).name in ("", ".", ".."):
        raise ConfigError(f"--out must be a file prefix such as results/run1, got {text!r}")
    return {s: Path(text + s) for s in suffixes}


def check_outputs(prefix: str | os.PathLike, suffixes: Iterable[str], overwrite: bool = False) -> dict[str, Path]:
    """Validate ``--out`` before a run: the folder can be made and written, no file is taken.

    Returns:
        the paths :func:`output_paths` gives.
    Raises:
        OutputExistsError: a file exists and ``overwrite`` is false.
        ConfigError: the prefix is a folder, or its folder cannot be created or written.
    """
    paths = output_paths(prefix, suffixes)
    taken = [str(p) for p in paths.values() if p.exists() or p.is_symlink()]
    if taken and not overwrite:
        raise OutputExistsError(
            f"output file(s) exist: {', '.join(taken)}; pass --overwrite to replace them or choose another --out"
        )
    for p in paths.values():
        if p.is_dir():
            raise ConfigError(f"--out {os.fspath(prefix)!r}: {p} is a folder, not a file")
    parent = next(iter(paths.values())).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {os.fspath(prefix)!r}: cannot create the folder {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {os.fspath(prefix)!r}: the folder {parent} is not writable")
    return paths


def atomic_write(path: Path, data: str | bytes, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    Without ``overwrite`` the final step is a hard link, which fails if ``path`` appeared in the
    meantime (so of two concurrent writers the second is refused instead of silently winning).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the permissions open() would
        if overwrite:
            os.replace(tmp, path)  # replaces a symlink itself, never its target
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExistsError(
                    f"{path} was created by someone else while this run was going; pass --overwrite "
                    "or choose another --out (finished rows are cached: a rerun is quick)"
                ) from None
            except OSError:  # file systems without hard links: check, then move
                if path.exists() or path.is_symlink():
                    raise OutputExistsError(f"{path} exists; pass --overwrite or choose another --out") from None
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_outputs(prefix: str | os.PathLike, contents: Mapping[str, str | bytes], overwrite: bool = False) -> list[Path]:
    """Write ``{suffix: text}`` as ``PREFIX + suffix`` files (see :func:`atomic_write`); returns the paths."""
    paths = check_outputs(prefix, contents, overwrite)
    for suffix, data in contents.items():
        atomic_write(paths[suffix], data, overwrite)
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return list(paths.values())
