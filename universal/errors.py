"""The toolkit's exceptions: one base class for every mistake a user can fix, and one
subclass per kind of failure, each also derived from the matching built-in exception so
that both `except UniversalNeuronsError` and `except FileExistsError` (etc.) catch it.

Every message names what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "UniversalNeuronsError",
    "ConfigError",
    "InputError",
    "InputNotFoundError",
    "OutputExistsError",
    "IncompatibleInputsError",
    "ModelUnavailableError",
    "CorruptFileError",
    "DiskSpaceError",
    "StoreWriteError",
]


class UniversalNeuronsError(Exception):
    """A predictable user error. The message says what was wrong and what to do."""


class ConfigError(UniversalNeuronsError, ValueError):
    """A setting or argument has a value the toolkit cannot use (a threshold outside (0, 1),
    an unknown baseline, a negative batch size, an unknown key in a saved config)."""


class InputError(UniversalNeuronsError, ValueError):
    """An input file or object is not what the stage needs (wrong kind of file, unreadable,
    missing columns, no tokens left after the mask)."""


class InputNotFoundError(UniversalNeuronsError, FileNotFoundError):
    """An input path (file, directory, checkpoint) does not exist."""


class OutputExistsError(UniversalNeuronsError, FileExistsError):
    """An output already exists and replacing it was not asked for (`--overwrite`)."""


class IncompatibleInputsError(UniversalNeuronsError, ValueError):
    """Inputs that must agree do not: different token sets, tokenizers, layers or checkpoints."""


class ModelUnavailableError(UniversalNeuronsError, OSError):
    """A model or checkpoint cannot be loaded here (hub unreachable, weights not cached)."""


class CorruptFileError(UniversalNeuronsError, OSError):
    """A file's stored checksum does not match its data (bit rot, a bad copy, a truncated
    write): its numbers cannot be trusted. The message names the file and what to redo."""


class DiskSpaceError(UniversalNeuronsError, OSError):
    """The planned output does not fit in the free space of its folder (checked before any work)."""


class StoreWriteError(UniversalNeuronsError, OSError):
    """The system refused a write while an activation store was being cached (disk full, a
    file-size limit); the rows finished so far are kept and the next run resumes."""
