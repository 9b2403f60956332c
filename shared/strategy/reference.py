"""``ComponentRef``: which strategy (or portfolio manager) to load, and with which params.

The one shape a component is named in once a message is read: a request's
:class:`shared.messages.ComponentSpec` becomes one (``ComponentSpec.ref()``), the sandbox runs
one (the runner reads it back from its job with :meth:`ComponentRef.from_json`) and
:func:`shared.strategy.load_component` loads one. It runs inside the sandbox: standard library
only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["ComponentError", "ComponentRef"]

_FORMS = ("builtin", "module", "source")
_KEYS = frozenset({*_FORMS, "class", "params"})


class ComponentError(ValueError):
    """A component spec cannot be resolved: unknown name, failed import, bad source or params."""


@dataclass(frozen=True)
class ComponentRef:
    """A builtin by name, a class in an importable module, or a class in uploaded code.

    Uploaded code is named by its ``source_sha256`` (how messages carry it) and travels as
    ``source`` once fetched; when both are given they must agree, so a mix-up between stored
    files fails here rather than as a wrong backtest (see :meth:`with_source`).
    """

    builtin: str | None = None
    module: str | None = None
    #: The class (or function) to load from ``module`` or ``source``.
    class_name: str | None = None
    source: str | None = None
    source_sha256: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        uploaded = self.source is not None or self.source_sha256 is not None
        if [self.builtin is not None, self.module is not None, uploaded].count(True) != 1:
            raise ComponentError(f"name exactly one of builtin, module or source: {self}")
        if self.source is None or self.source_sha256 is None:
            return
        actual = hashlib.sha256(self.source.encode()).hexdigest()
        if actual != self.source_sha256:
            raise ComponentError(
                f"the uploaded source has sha256 {actual}, but {self.source_sha256} was asked"
                " for: the source store returned the wrong file"
            )

    @property
    def label(self) -> str:
        """A short name for messages: ``builtin 'sma_cross'``, ``class 'Pairs'``."""
        if self.builtin is not None:
            return f"builtin {self.builtin!r}"
        return f"class {self.class_name!r}"

    def with_source(self, source: str | None) -> ComponentRef:
        """This reference with its uploaded code, as fetched by ``source_sha256``.

        :raises ComponentError: the code is missing, or its sha256 is not ``source_sha256``.
        """
        if source is None:
            raise ComponentError(f"no uploaded source has sha256 {self.source_sha256}")
        return replace(self, source=source)

    @property
    def code(self) -> str:
        """The uploaded code; :class:`ComponentError` if only its sha256 is at hand."""
        if self.source is None:
            raise ComponentError(
                f"{self.label} names uploaded code ({self.source_sha256}) but does not carry"
                " it: fetch it first (with_source)"
            )
        return self.source

    def to_json(self) -> dict[str, Any]:
        """The JSON form :meth:`from_json` reads (what the sandbox runner is sent), uploaded
        code inline."""
        spec: dict[str, Any]
        if self.builtin is not None:
            spec = {"builtin": self.builtin}
        elif self.module is not None:
            spec = {"module": self.module, "class": self.class_name}
        else:
            spec = {"source": self.code, "class": self.class_name}
        return {**spec, "params": dict(self.params)}

    @classmethod
    def from_json(cls, spec: object, *, kind: str = "strategy") -> ComponentRef:
        """Read a spec written as JSON: a builtin's name, or a mapping with exactly one of
        ``builtin``, ``module`` or ``source`` (the last two with ``class``) and optionally
        ``params``.

        :param kind: what is named, as the user calls it ("strategy", "portfolio manager"):
            used in messages.
        :raises ComponentError: worded for the user who wrote the spec.
        """
        if isinstance(spec, str):
            return cls(builtin=spec)
        if not isinstance(spec, Mapping):
            raise ComponentError(
                f"a {kind} spec must be a name such as 'sma_cross' or a mapping with one of "
                f"'builtin', 'module' or 'source'; got {type(spec).__name__} {spec!r}"
            )
        unknown = sorted(str(key) for key in spec if key not in _KEYS)
        if unknown:
            raise ComponentError(
                f"unknown key(s) {', '.join(map(repr, unknown))} in {kind} spec; "
                f"the keys are: {', '.join(sorted(_KEYS))}"
            )
        forms = [form for form in _FORMS if form in spec]
        if len(forms) != 1:
            example = "{'builtin': 'sma_cross'} or {'source': '...', 'class': 'MyStrategy'}"
            if forms:
                given = " and ".join(map(repr, forms))
                raise ComponentError(
                    f"a {kind} spec takes only one of 'builtin', 'module' or 'source', "
                    f"got {given}; e.g. {example}"
                )
            raise ComponentError(
                f"a {kind} spec needs one of 'builtin', 'module' or 'source', e.g. {example}"
            )
        form = forms[0]
        params = spec.get("params") or {}
        if not isinstance(params, Mapping):
            raise ComponentError(
                f"'params' in a {kind} spec must be a mapping of parameter names to values, "
                f"got {type(params).__name__} {params!r}"
            )
        value = spec[form]
        if not isinstance(value, str) or not value:
            raise ComponentError(
                f"{form!r} in a {kind} spec must be a non-empty string, got {value!r}"
            )
        if form == "builtin":
            if "class" in spec:
                raise ComponentError(
                    f"'class' goes with 'module' or 'source', not with 'builtin'; "
                    f"use {{'builtin': {value!r}}}"
                )
            return cls(builtin=value, params=params)
        class_name = spec.get("class")
        if not isinstance(class_name, str) or not class_name:
            raise ComponentError(
                f"a {kind} spec with {form!r} needs 'class', the name of the class to use, "
                f"e.g. {{{form!r}: ..., 'class': 'MyStrategy'}}"
                + ("" if class_name is None else f"; got {class_name!r}")
            )
        if form == "module":
            return cls(module=value, class_name=class_name, params=params)
        return cls(source=value, class_name=class_name, params=params)
