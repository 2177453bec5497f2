"""Client-side pickling: the function once per job, the user's own modules by value.

A function defined in a file next to the user's script (not an installed package) cannot be
imported on a replica, which shares neither the client's ``sys.path`` nor its filesystem.
Such modules are registered with cloudpickle to travel *by value*, as Lithops'
``include_modules`` does; installed packages and the standard library are referenced by name.
"""

from __future__ import annotations

import copyreg
import hashlib
import io
import linecache
import os
import pickle
import re
import site
import sys
import sysconfig
import threading
import types
from collections import ChainMap
from collections.abc import Callable
from types import ModuleType
from typing import Any

import cloudpickle

from .errors import SerializationError

PROTOCOL = 5
_NEVER_BY_VALUE = frozenset({"async_ca_exec", "acx_server", "cloudpickle", "__main__", "__mp_main__"})

_lock = threading.Lock()
_registered: set[str] = set()
_seen_modules = 0
_roots: tuple[str, ...] | None = None


def _library_roots() -> tuple[str, ...]:
    global _roots
    if _roots is None:
        paths = set()
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            p = sysconfig.get_paths().get(key)
            if p:
                paths.add(p)
        try:
            paths.update(site.getsitepackages())
        except AttributeError:  # pragma: no cover - old virtualenv
            pass
        user_site = getattr(site, "getusersitepackages", lambda: None)()
        if user_site:
            paths.add(user_site)
        _roots = tuple(sorted({os.path.realpath(p) + os.sep for p in paths}))
    return _roots


def is_user_module(name: str, module: ModuleType) -> bool:
    """True for a module loaded from a file outside the standard library and site-packages."""
    top = name.partition(".")[0]
    if top in _NEVER_BY_VALUE or top != name:
        return False
    path = getattr(module, "__file__", None)
    if not path or not isinstance(path, str):
        return False
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not real.startswith(_library_roots())


def register_user_modules() -> list[str]:
    """Register every user module imported so far to be pickled by value; return new ones."""
    global _seen_modules
    if len(sys.modules) == _seen_modules:
        return []
    new = []
    with _lock:
        for name, module in list(sys.modules.items()):
            if name in _registered or module is None:
                continue
            try:
                user = is_user_module(name, module)
            except Exception:  # noqa: BLE001 - odd module objects are simply not shipped
                user = False
            if user:
                try:
                    cloudpickle.register_pickle_by_value(module)
                except ValueError:  # not importable under that name: leave it by reference
                    continue
                _registered.add(name)
                new.append(name)
        _seen_modules = len(sys.modules)
    return new


_DYNAMIC_FILENAME = "<dynamic-code>"
_cloudpickle_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)


def _code_reduce(code: types.CodeType) -> Any:
    # cloudpickle replaces the file name of code pickled by value with "<dynamic-code>";
    # keep the real one so remote tracebacks name the user's file.
    reducer, args = _cloudpickle_code_reduce(code)  # type: ignore[misc]
    return reducer, tuple(code.co_filename if a == _DYNAMIC_FILENAME else a for a in args)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc,name-defined]
    if _cloudpickle_code_reduce is not None:
        _dispatch_table = {**cloudpickle.Pickler._dispatch_table, types.CodeType: _code_reduce}
        dispatch_table = ChainMap(_dispatch_table, copyreg.dispatch_table)


def dumps(obj: Any) -> bytes:
    with io.BytesIO() as f:
        _Pickler(f, protocol=PROTOCOL).dump(obj)
        return f.getvalue()


_TB_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in ')


def add_source_lines(tb: str) -> str:
    """Fill in the source lines a remote traceback lacks (the worker has no copy of the
    user's files; this client has)."""
    lines = tb.splitlines()
    out: list[str] = []
    for k, line in enumerate(lines):
        out.append(line)
        m = _TB_FRAME.match(line)
        if m and not (k + 1 < len(lines) and lines[k + 1].startswith("    ")):
            src = linecache.getline(m["file"], int(m["line"])).strip()
            if src:
                out.append(f"    {src}")
    return "\n".join(out) + ("\n" if tb.endswith("\n") else "")


def _describe(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    mod = getattr(obj, "__module__", None)
    return f"{mod}.{name}" if name and mod else repr(obj)[:80]


def dumps_function(fn: Callable[..., Any]) -> tuple[bytes, str]:
    """Pickle ``fn`` (and the user modules it needs); return the bytes and their SHA-256."""
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    register_user_modules()
    try:
        data = dumps(fn)
    except Exception as exc:
        raise SerializationError(
            f"function {_describe(fn)} cannot be pickled: {type(exc).__name__}: {exc}. "
            "Everything it refers to (globals, closure variables) must be picklable; create "
            "clients, locks or open files inside the function instead"
        ) from exc
    return data, hashlib.sha256(data).hexdigest()


#: Types that pickle to the same bytes with the standard pickler as with cloudpickle (exact
#: types: a subclass may be a user's class, which cloudpickle may have to pickle by value).
_ATOMIC = frozenset({int, float, str, bytes, bool, type(None), complex})
_CONTAINERS = frozenset({tuple, list})


def is_plain(values: Any) -> bool:
    """Whether ``values`` (a tuple or dict's values) are atomic, or short flat tuples/lists of them."""
    for v in values:
        t = type(v)
        if t in _ATOMIC:
            continue
        if t in _CONTAINERS and len(v) <= 16 and all(type(x) in _ATOMIC for x in v):
            continue
        return False
    return True


def dumps_items(items: list[tuple[tuple[Any, ...], dict[str, Any]]], call_id: str) -> bytes:
    """Pickle the ``(args, kwargs)`` pairs of one request.

    Plain arguments (numbers, strings, bytes, short flat tuples/lists of them) take the C
    pickler: the same bytes for less than a cloudpickle Pickler costs to create, which is most
    of the client's pickling time per call at chunksize 1."""
    try:
        if all(is_plain(args) and (not kwargs or is_plain(kwargs.values())) for args, kwargs in items):
            return pickle.dumps(items, PROTOCOL)
        return dumps(items)
    except Exception as exc:
        # Find the item and the argument that fails, to name it.
        for k, (args, kwargs) in enumerate(items):
            for pos, value in [*enumerate(args), *kwargs.items()]:
                try:
                    dumps(value)
                except Exception as inner:
                    where = f"positional argument {pos}" if isinstance(pos, int) else f"keyword argument {pos!r}"
                    raise SerializationError(
                        f"{where} of call {call_id}{'' if len(items) == 1 else f' (item {k})'} "
                        f"is a {type(value).__module__}.{type(value).__qualname__} that cannot be pickled: "
                        f"{type(inner).__name__}: {inner}"
                    ) from inner
        raise SerializationError(f"the arguments of call {call_id} cannot be pickled: {type(exc).__name__}: {exc}") from exc


def loads(data: bytes | memoryview) -> Any:
    return cloudpickle.loads(data)
