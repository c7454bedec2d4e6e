"""Errors kvpipe raises on purpose. Each one says what is wrong and what to do."""


class KVPipeError(Exception):
    """Base class of every error kvpipe raises deliberately."""


class SpecError(KVPipeError, ValueError):
    """A pipeline spec is invalid. ``str(err)`` is one line: ``FILE:LINE:COL: key.path: message``."""

    def __init__(self, message: str, source: str = "<dict>", line: int | None = None,
                 column: int | None = None, path: str = ""):
        self.message, self.source, self.line, self.column, self.path = message, source, line, column, path
        where = source if line is None else f"{source}:{line}:{column}"
        super().__init__(f"{where}: {path + ': ' if path else ''}{message}")


class BudgetError(KVPipeError, ValueError):
    """A budget cannot be met (for example, it is smaller than the protected tokens)."""


class UnsupportedModelError(KVPipeError, ValueError):
    """The model, its attention implementation or the cache handed to it cannot be used with kvpipe."""


class FileError(KVPipeError, ValueError):
    """A file handed to kvpipe (a saved cache, its index, a gate file) is refused. ``str(err)`` is one line:
    ``FILE: field: what is wrong``."""

    def __init__(self, path, field: str, message: str):
        self.path, self.field = path, field
        super().__init__(f"{path}: {field + ': ' if field else ''}{message}")
