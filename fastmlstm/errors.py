"""The project's input errors: one small family, so that callers can tell bad input from a bug.

Every place that rejects what a user gave (an argument, a tensor's shape or dtype, a path, a file's
content, a download) raises an :class:`InputError`. It subclasses ``ValueError``, so code that
catches ``ValueError`` keeps working; the variants also subclass the built-in error a Python
programmer would expect (``TypeError`` for a wrong type, ``FileNotFoundError`` for a missing file).
The ``fastmlstm`` command and ``train.py`` turn exactly this family into one ``error:`` line and
exit status 2; any other exception is a bug and keeps its traceback.

    InputError                      bad input (a ValueError)
    ├── InputTypeError              ... of the wrong type or dtype (also a TypeError)
    ├── MissingInputError           ... a file or folder that is not there (also a FileNotFoundError)
    ├── ModelFileError              ... a file that is not a readable model of this library
    └── MissingDependencyError      ... asks for an optional extra that is not installed (also an ImportError)
"""

from __future__ import annotations

__all__ = ["InputError", "InputTypeError", "MissingDependencyError", "MissingInputError", "ModelFileError",
           "require"]


class InputError(ValueError):
    """Bad input from the user; the message says what was wrong and, where it helps, what to do."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type, or a tensor of the wrong dtype."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named (or that a default points at) does not exist."""


class ModelFileError(InputError):
    """A file or folder that is not a readable model: empty, truncated, foreign, or unsafe to load."""


class MissingDependencyError(InputError, ImportError):
    """A feature needs an optional dependency that is not installed; the message says what to install."""


def require(module: str, *, extra: str, feature: str):
    """Import and return ``module``, or raise :class:`MissingDependencyError` naming the extra
    (``pip install 'fastmlstm[<extra>]'``) that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs {module.split('.')[0]}, which is not installed: pip install 'fastmlstm[{extra}]' "
            f"(or pip install {module.split('.')[0]})") from exc


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: a MemoryError, or the RuntimeError of one of
    torch's allocators (the CPU's "can't allocate memory", CUDA's OutOfMemoryError: "out of memory")."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc) if isinstance(exc, RuntimeError) else ""
    return "can't allocate memory" in text or "out of memory" in text
