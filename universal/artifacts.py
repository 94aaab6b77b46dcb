"""Writing results safely: the one place that decides whether an output may be written,
writes it atomically, and reuses or refuses what an earlier run left.

Every stage writes through these helpers, so the rules hold everywhere:

- an existing output is never replaced unless the caller asked for it (`overwrite=True`,
  the CLI's `--overwrite`), and the refusal comes before any work;
- an output is written to a temporary file beside it and renamed into place only once it
  is complete, so a crash or a full disk leaves the previous result (or nothing) at the
  final path, never half a file;
- an output path may not be one of the command's own inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import ConfigError, InputError, InputNotFoundError, OutputExistsError
from .runtime import from_json, to_json

__all__ = [
    "exists_message",
    "refuse_existing",
    "refuse_existing_results",
    "check_writable",
    "check_not_input",
    "atomic_path",
    "write_text",
    "write_json",
    "read_json",
    "plain",
    "reuse_or_refuse",
    "reading",
    "hdf5_file",
]

OVERWRITE_HINT = "pass --overwrite (overwrite=True in Python) to replace it, or choose another path"


def exists_message(path: str | os.PathLike, what: str = "") -> str:
    """The one wording of "this output exists": names the path and both ways to proceed."""
    return f"{what + ' ' if what else ''}{os.fspath(path)} already exists; {OVERWRITE_HINT}"


def refuse_existing(*paths: str | os.PathLike, overwrite: bool) -> None:
    """Raise `OutputExistsError` for the first of `paths` that exists, unless `overwrite`.

    Call it before the work, so a refused run costs nothing."""
    if overwrite:
        return
    for p in paths:
        if os.path.lexists(p):
            raise OutputExistsError(exists_message(p))


def refuse_existing_results(folder: str | os.PathLike, names: Iterable[str], *, what: str,
                            overwrite: bool) -> Path:
    """Refuse, before any work, a folder that already holds a stage's results (any of `names`).

    Returns:
        `folder` as a `Path`.

    Raises:
        OutputExistsError: naming the folder, the stage and the files found, unless `overwrite`.
    """
    out = Path(folder)
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{out} already holds {what} results ({', '.join(existing)}); {OVERWRITE_HINT}")
    return out


def check_writable(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check, before any work, that `path` can be written: not an existing file (unless
    `overwrite`), not a directory, and its folder exists (it is created) and is writable.

    **Returns** `path` as a `Path`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file path for this output")
    refuse_existing(path, overwrite=overwrite)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {folder}: {e.strerror}; choose another path") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"the output folder {folder} is not writable; choose another path or fix its permissions")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output path that is one of the command's inputs (the same file under any
    name): writing it would destroy the input, even with `--overwrite`."""
    out = Path(output)
    for i in inputs:
        if i is None:
            continue
        i = Path(i)
        if _same_file(out, i) or out.resolve() == i.resolve():
            raise ConfigError(f"the output {out} is also an input of this command; choose another output path")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends
    without an error, deleted when it raises (a full disk, an interrupt).

    The temporary name keeps `path`'s suffix, so writers that look at it (pandas, h5py)
    behave the same. The existence check is repeated just before the rename, so a result
    that appeared meanwhile is not replaced unless `overwrite`.
    """
    path = check_writable(path, overwrite=overwrite)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        refuse_existing(path, overwrite=overwrite)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def plain(obj: Any) -> Any:
    """`obj` as it reads back from JSON (numpy scalars to numbers, tuples to lists, paths
    to strings): what to compare a configuration with a saved one by."""
    return from_json(to_json(obj))


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = False, indent: int | None = 2) -> Path:
    """Write `obj` as JSON (sorted keys; numpy values and paths allowed) atomically."""
    return write_text(path, json.dumps(plain(obj), indent=indent, sort_keys=True) + "\n", overwrite=overwrite)


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """Read a JSON file, with errors that name the file: missing, unreadable, not JSON."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not a readable {what} ({e}); was it written by universal-neurons?") from e


def reuse_or_refuse(path: str | os.PathLike, *, overwrite: bool, matches: Callable[[Path], bool],
                    what: str = "result") -> bool:
    """Decide what to do with an output an earlier run may have left.

    **Returns** `True` when `path` exists and `matches(path)` says it was made from the same
    inputs and settings (reuse it), `False` when it must be computed (absent, or
    `overwrite`). **Raises** `OutputExistsError` when it exists, differs, and `overwrite`
    was not given.
    """
    path = Path(path)
    if overwrite or not path.exists():
        return False
    if matches(path):
        return True
    raise OutputExistsError(f"{path} holds a {what} made from other inputs (other models, tokens or settings); "
                            "use a new output directory, or pass --overwrite (overwrite=True in Python) to "
                            "recompute it")


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, fix: str) -> Iterator[None]:
    """Read an input file inside this block: a file that is not what it should be (not HDF5,
    truncated, another kind of file, missing fields, not UTF-8, unparsable) becomes one
    `InputError` naming the file, what it should have been, and `fix`.

    Args:
        path: the file being read.
        what: what it should be ("correlation result", "universality table").
        fix: how to get a good one ("recompute it with `universal-neurons correlate`").
    """
    try:
        yield
    except (InputError, InputNotFoundError, ConfigError):
        raise
    except (OSError, KeyError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if isinstance(e, OSError) and not isinstance(e, UnicodeDecodeError) and e.errno is not None:
            detail = e.strerror or str(e)  # a system error (permissions, ...), not a format problem
        else:
            detail = f"{type(e).__name__}: {e}"
        raise InputError(f"{os.fspath(path)} is not a readable {what} ({detail}); {fix}") from e


@contextlib.contextmanager
def hdf5_file(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Any]:
    """A new HDF5 file for `path`, built in memory and written atomically when the block ends.

    For artefacts that fit in memory (results, tables, token sets): the whole file is one
    buffered write of its image, so a full disk or a file-size limit is an ordinary `OSError`
    before the rename (the previous file stays, no temporary is left), instead of HDF5 failing
    half-way through its own writes and leaving its library in a state that can crash the
    process at exit. Activation stores, far larger, stream to disk instead (`cache_activations`).

    Yields:
        An `h5py.File` open for writing.
    """
    import h5py

    check_writable(path, overwrite=overwrite)
    f = h5py.File(f"in-memory:{os.fspath(path)}", "w", driver="core", backing_store=False)
    try:
        yield f
        f.flush()
        image = f.id.get_file_image()
    finally:
        f.close()
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(image)
