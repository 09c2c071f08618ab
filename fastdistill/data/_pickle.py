"""A pickle reader that only rebuilds plain containers and numeric numpy arrays.

Dataset pickles (the MNIST ``mnist.pkl.gz``, the CIFAR python batches) were written by
``cPickle``; unpickling them with the stock :mod:`pickle` would run any callable the file names.
:class:`RestrictedUnpickler` resolves a global only if it is in an explicit allow-list of numpy's
array-reconstruction functions (and, for CIFAR, the latin-1 ``_codecs.encode`` that Python 3
itself emits for ``bytes`` under protocol 2); anything else raises :class:`DataError`.
"""
from __future__ import annotations

import codecs
import pickle
from typing import IO, Any, Dict, Tuple

import numpy as np

from ..errors import DataError

__all__ = ["RestrictedUnpickler", "safe_load"]

_NUMERIC_KINDS = "biufc"  # bool, signed, unsigned, float, complex: no object/void/str fields


def _numeric_dtype(obj: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """``numpy.dtype`` as the pickle calls it, restricted to plain numeric dtypes.

    ``copy`` is forced on: a pickle's later BUILD step calls ``__setstate__`` on the result, and
    must never mutate numpy's shared built-in dtype instances.
    """
    if isinstance(obj, bytes):  # Python-2 pickles read with encoding="bytes"
        obj = obj.decode("latin-1")
    if not isinstance(obj, str):
        raise pickle.UnpicklingError(f"dtype spec {type(obj).__name__} is not a type string")
    d = np.dtype(obj, align=bool(align), copy=True)
    if d.kind not in _NUMERIC_KINDS or d.hasobject:
        raise pickle.UnpicklingError(f"dtype {d} is not a plain numeric dtype")
    return d


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle ``bytes`` at protocol 2 (latin-1 only)."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin-1")


_reconstruct = np.empty(0).__reduce__()[0]          # numpy(._core).multiarray._reconstruct
_frombuffer = np.empty(0).__reduce_ex__(5)[0]       # numpy(._core).numeric._frombuffer (protocol 5)

#: (module, name) -> object: numpy's array reconstruction under both its 1.x and 2.x module names.
NUMPY_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
}

#: Extra globals for containers of bytes written by Python 3 at protocol 2.
BYTES_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): bytes,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("__builtin__", "bytes"): bytes,
    ("__builtin__", "dict"): dict,
    ("__builtin__", "list"): list,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only an allow-list of globals.

    Args:
        file: a binary file object positioned at the start of the pickle.
        source: the file's name, used in error messages.
        allowed: ``(module, name) -> object``; defaults to :data:`NUMPY_GLOBALS`.
        encoding: how Python-2 ``str`` objects are decoded (``"latin1"`` or ``"bytes"``).

    Raises:
        DataError: from :meth:`find_class` when the pickle names any other global.
    """

    def __init__(self, file: IO[bytes], *, source: str, allowed: Dict[Tuple[str, str], Any] = None,
                 encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self.source = source
        self.allowed = NUMPY_GLOBALS if allowed is None else allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(f"{self.source}: refusing to unpickle {module}.{name} (only numpy arrays "
                            f"and plain containers are allowed); replace it with a trusted copy of the "
                            f"dataset file") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source}: pickle uses persistent ids, which a dataset file never does; "
                        f"replace it with a trusted copy of the dataset file")


def _check_plain(obj: Any, source: str, depth: int = 0) -> None:
    """Every array in ``obj`` (nested dict/list/tuple) must have a numeric dtype."""
    if depth > 8:
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NUMERIC_KINDS or obj.dtype.hasobject:
            raise DataError(f"{source}: contains an array of dtype {obj.dtype}; replace it with a "
                            f"trusted copy of the dataset file")
    elif isinstance(obj, dict):
        for v in obj.values():
            _check_plain(v, source, depth + 1)
    elif isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], (np.ndarray, list, tuple, dict)):
        for v in obj:
            _check_plain(v, source, depth + 1)


def safe_load(file: IO[bytes], *, source: str, encoding: str = "latin1",
              allow_bytes_globals: bool = False) -> Any:
    """Unpickle ``file`` with :class:`RestrictedUnpickler`.

    Args:
        file: binary file object (e.g. a ``gzip.GzipFile``).
        source: file name for error messages.
        encoding: ``"latin1"`` (numpy data pickled by Python 2) or ``"bytes"`` (CIFAR batches,
            whose dict keys must stay ``bytes``).
        allow_bytes_globals: also admit :data:`BYTES_GLOBALS`.

    Returns:
        The unpickled object (containers of numbers, bytes, str and numeric ``np.ndarray``).

    Raises:
        DataError: a forbidden global, or a truncated/corrupt stream.
    """
    allowed = {**NUMPY_GLOBALS, **BYTES_GLOBALS} if allow_bytes_globals else NUMPY_GLOBALS
    try:
        obj = RestrictedUnpickler(file, source=source, allowed=allowed, encoding=encoding).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OSError, MemoryError, UnicodeDecodeError) as e:
        raise DataError(f"{source}: corrupt or truncated pickle ({type(e).__name__}: {e}); delete it and "
                        f"fetch the dataset again") from None
    _check_plain(obj, source)
    return obj
