"""Resolve a :class:`~shared.strategy.reference.ComponentRef` — a strategy, or on the trusted
side a portfolio manager — to an object.

Classes are instantiated with the reference's params; plain callables are returned as they
are. Every failure is a :class:`ComponentError` worded for the user who wrote the spec: what
was asked for, what exists (names, a class's parameters), where the code went wrong.

This module runs inside the sandbox too: standard library only.
"""

from __future__ import annotations

import builtins
import difflib
import importlib
import inspect
import linecache
import sys
import types
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from .reference import ComponentError, ComponentRef

__all__ = ["ComponentError", "load_component"]


def load_component(
    ref: ComponentRef,
    *,
    registry: Mapping[str, Any],
    kind: str = "strategy",
    base: type | None = None,
    imports: Collection[str] | None = None,
) -> Any:
    """The component ``ref`` names: an instance of its class with its params, or the
    callable itself.

    :param registry: the builtin components by name (e.g. `BUILTIN_STRATEGIES`).
    :param kind: what is being loaded, as the user calls it ("strategy", "portfolio
        manager"); used in messages and in the name of a module made from source.
    :param base: when given, the component must be a class derived from it.
    :param imports: when given, uploaded source may import only the standard library and
        these top-level packages; another import raises `ModuleNotFoundError` saying so. A
        guard against code that would fail where only those are installed (the Docker
        image), not a security boundary: `importlib` gets around it.
    :raises ComponentError: the reference cannot be resolved or the class rejects the params.
    """
    if ref.builtin is not None:
        label = repr(ref.builtin)
        target = _from_registry(ref.builtin, registry, kind)
    elif ref.module is not None:
        label = repr(ref.class_name)
        module = _import(ref.module, kind)
        target = _attribute(module, str(ref.class_name), f"{kind} module {ref.module!r}")
    else:
        label = repr(ref.class_name)
        module = _exec_source(ref.code, kind, imports)
        target = _attribute(module, str(ref.class_name), f"{kind} source")
    if base is not None and not (isinstance(target, type) and issubclass(target, base)):
        raise ComponentError(
            f"{kind} {label} is not a {base.__name__}: define it as a class derived from "
            f"{base.__name__}, e.g. `class MyStrategy({base.__name__}): ...`"
        )
    return _instantiate(target, ref.params, kind, label)


def _from_registry(name: str, registry: Mapping[str, Any], kind: str) -> Any:
    try:
        return registry[name]
    except KeyError:
        pass
    plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
    if not registry:
        raise ComponentError(f"unknown {kind} {name!r}; there are no builtin {plural}")
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ComponentError(
        f"unknown {kind} {name!r}; builtin {plural} are: {', '.join(sorted(registry))}{hint}"
    )


def _import(name: str, kind: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ComponentError(
            f"cannot import {kind} module {name!r}: {exc}; it must be importable where the "
            f"{kind} runs (for uploaded code use {{'source': ..., 'class': ...}})"
        ) from exc
    except Exception as exc:
        raise ComponentError(
            f"importing {kind} module {name!r} raised {type(exc).__name__}: {exc}"
        ) from exc


def _exec_source(
    source: str, kind: str, imports: Collection[str] | None = None
) -> types.ModuleType:
    """Run `source` as a fresh module whose tracebacks show `<kind source>` and line numbers;
    with `imports`, its imports are limited to the standard library and those packages."""
    slug = kind.replace(" ", "_")
    filename = f"<{kind} source>"
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as exc:
        raise ComponentError(_syntax_message(exc, kind)) from exc
    except ValueError as exc:  # e.g. null bytes
        raise ComponentError(f"{kind} source cannot be compiled: {exc}") from exc

    module_name = f"stratorch_user_{slug}"
    module = types.ModuleType(module_name)
    module.__file__ = filename
    if imports is not None:
        # The module's own builtins: its code (and its functions, later) imports through the
        # guard, while numpy and pandas keep the real `__import__` in their globals.
        module.__dict__["__builtins__"] = {
            **vars(builtins),
            "__import__": _guarded_import(frozenset(imports), kind),
        }
    # Tracebacks read source lines through linecache; a None mtime keeps checkcache() off it.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    # Registered before running, as importlib does, so dataclasses, pickle and
    # typing.get_type_hints can find the module of the classes it defines.
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        line = _last_line_in(exc.__traceback__, filename)
        at = f" at line {line}" if line is not None else ""
        raise ComponentError(
            f"{kind} source raised {type(exc).__name__}{at} while loading: {exc}"
        ) from exc
    return module


def _guarded_import(allowed: frozenset[str], kind: str) -> Callable[..., types.ModuleType]:
    real = builtins.__import__

    def guarded(
        name: str,
        globals: Mapping[str, object] | None = None,
        locals: Mapping[str, object] | None = None,
        fromlist: Sequence[str] = (),
        level: int = 0,
    ) -> types.ModuleType:
        top = name.partition(".")[0]
        if level == 0 and top not in allowed and top not in sys.stdlib_module_names:
            raise ModuleNotFoundError(
                f"{kind} code may import only the standard library and "
                f"{', '.join(sorted(allowed))}, not {name!r} (nothing else is installed "
                "where it runs)",
                name=name,
            )
        return real(name, globals, locals, fromlist, level)

    return guarded


def _syntax_message(exc: SyntaxError, kind: str) -> str:
    message = f"{kind} source has a syntax error at line {exc.lineno}: {exc.msg}"
    text = (exc.text or "").rstrip("\r\n")
    if text.strip():
        indent = len(text) - len(text.lstrip())
        message += f"\n    {text.strip()}"
        if exc.offset is not None and exc.offset - 1 >= indent:
            message += "\n    " + " " * (exc.offset - 1 - indent) + "^"
    return message


def _last_line_in(tb: types.TracebackType | None, filename: str) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _attribute(module: types.ModuleType, name: str, where: str) -> Any:
    try:
        return getattr(module, name)
    except AttributeError:
        pass
    classes = sorted(
        attr
        for attr, value in vars(module).items()
        if isinstance(value, type) and value.__module__ == module.__name__
    )
    there = f"classes defined there: {', '.join(classes)}" if classes else "it defines no classes"
    close = difflib.get_close_matches(name, classes, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ComponentError(f"{where} has no class {name!r}{hint}; {there}")


def _instantiate(target: Any, params: Mapping[str, Any], kind: str, label: str) -> Any:
    if isinstance(target, type):
        _check_param_names(target, params, kind)
        try:
            return target(**params)
        except ValueError as exc:  # the class's own check, already worded for the user
            raise ComponentError(str(exc)) from exc
        except Exception as exc:
            args = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ComponentError(
                f"creating {kind} {target.__name__}({args}) raised {type(exc).__name__}: {exc}"
            ) from exc
    if callable(target):
        if params:
            raise ComponentError(
                f"{kind} {label} is a function, not a class, so it takes no params; "
                f"got {', '.join(sorted(params))}"
            )
        return target
    raise ComponentError(
        f"{kind} {label} is neither a class nor a function "
        f"(got {type(target).__name__} {target!r:.60})"
    )


def _check_param_names(cls: type, params: Mapping[str, Any], kind: str) -> None:
    """An unknown parameter names the class and lists its parameters, as
    `BaseStrategy` does for strategies (whose `**params` signature leaves the check to it)."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # a builtin type, or one without a signature
        return
    accepted = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    known = [p.name for p in signature.parameters.values() if p.kind in accepted]
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    for name in params:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            there = f"its parameters are: {', '.join(known)}" if known else "it takes none"
            raise ComponentError(
                f"{kind} {cls.__name__} got unknown parameter {name!r}{hint}; {there}"
            )
