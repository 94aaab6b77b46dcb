"""The toolkit's one exception type for mistakes a user can fix."""

__all__ = ["UniversalNeuronsError"]


class UniversalNeuronsError(Exception):
    """A predictable user error. The message says what was wrong and what to do."""
