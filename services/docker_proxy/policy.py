"""What the Docker API proxy lets through: exactly what :class:`shared.sandbox.DockerSandbox`
does, for containers of the sandbox image with its hardened settings, and nothing else.

Pure functions over a parsed request; :mod:`services.docker_proxy.proxy` does the I/O. Anything
not listed is refused — other endpoints (exec, images, build, volumes, networks, the host's
events...), other images, and any container setting this module does not know, so a field
Docker adds later is refused until someone decides it is safe.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.sandbox.docker import LABEL

__all__ = ["LIVE_STATES", "Allowed", "Denied", "Rules", "check", "check_container", "check_count"]

#: Characters a path may have: ids, names and tags; no ``%`` (no second decoding), no ``..``.
_PATH = re.compile(r"^(/v1\.\d{1,2})?(/[A-Za-z0-9_.:-]+)+$")
_ID = r"(?P<id>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})"
#: The sandbox's label, as a ``filters`` label on the container list.
_SANDBOX_FILTER = f"{LABEL}=1"
#: The container states that count against :attr:`Rules.max_containers`.
LIVE_STATES = ("created", "restarting", "running", "paused")


class Denied(Exception):
    """The request is refused; the message says why (it goes back to the client)."""


@dataclass(frozen=True)
class Rules:
    """What the proxy allows."""

    #: The only image containers may be created from (``STRATORCH_SANDBOX_IMAGE``).
    image: str
    #: The only OCI runtime a container may ask for besides dockerd's default.
    runtime: str | None = None
    #: Caps on what one container may ask for.
    max_memory_bytes: int = 16 * 1024**3
    max_pids: int = 1024
    #: Sandbox containers that may exist at once (not yet exited): a compromised worker
    #: cannot start them by the thousand.
    max_containers: int = 256


@dataclass(frozen=True)
class Allowed:
    """Forward the request as ``method path?query``."""

    method: str
    path: str
    query: list[tuple[str, str]]
    #: A container-scoped request: forward only if this container is a sandbox
    #: (:func:`check_container` on its inspect document).
    container: str | None = None
    #: The endpoint hijacks the connection (``attach``): relay both ways after the 101.
    upgrade: bool = False


_Route = tuple[str, re.Pattern[str], frozenset[str], bool]


def _route(method: str, pattern: str, params: str = "", upgrade: bool = False) -> _Route:
    return method, re.compile(f"^{pattern}$"), frozenset(params.split()), upgrade


#: method, path, the query parameters it may carry, hijacked; the container routes need the
#: container to be a sandbox.
_CONTAINER_ROUTES = [
    _route("POST", rf"/containers/{_ID}/start"),
    _route(
        "POST",
        rf"/containers/{_ID}/attach",
        "stream stdin stdout stderr logs detachKeys",
        upgrade=True,
    ),
    _route("POST", rf"/containers/{_ID}/wait", "condition"),
    _route("POST", rf"/containers/{_ID}/kill", "signal"),
    _route("GET", rf"/containers/{_ID}/json", "size"),
    _route("DELETE", rf"/containers/{_ID}", "force v"),
]
_PLAIN_ROUTES = [
    _route("GET", "/_ping"),
    _route("HEAD", "/_ping"),
    _route("GET", "/version"),
    _route("GET", "/info"),  # the runtime check (STRATORCH_SANDBOX_RUNTIME)
]


def check(
    rules: Rules, method: str, path: str, query: list[tuple[str, str]], body: bytes
) -> Allowed:
    """The request as it may be forwarded; :class:`Denied` if it may not."""
    if not _PATH.match(path) or {".", ".."} & set(path.split("/")):
        raise Denied(f"malformed path {path!r}")
    version = re.match(r"^/v1\.\d{1,2}", path)
    endpoint = path[version.end() :] if version else path
    params = {name for name, _ in query}

    def allow(
        allowed: frozenset[str], container: str | None = None, upgrade: bool = False
    ) -> Allowed:
        if extra := params - allowed:
            raise Denied(f"{method} {endpoint}: query parameter(s) {sorted(extra)} not allowed")
        if body and method != "POST":
            raise Denied(f"{method} {endpoint} takes no body")
        return Allowed(method, path, query, container=container, upgrade=upgrade)

    for m, pattern, allowed, upgrade in _CONTAINER_ROUTES:
        if m == method and (found := pattern.match(endpoint)):
            if body:
                raise Denied(f"{method} {endpoint} takes no body")
            return allow(allowed, container=found["id"], upgrade=upgrade)
    for m, pattern, allowed, _ in _PLAIN_ROUTES:
        if m == method and pattern.match(endpoint):
            return allow(allowed)
    if method == "GET" and endpoint == f"/images/{rules.image}/json":
        return allow(frozenset())
    if method == "GET" and endpoint == "/containers/json":
        _check_list_filters(query)
        return allow(frozenset({"all", "filters", "limit"}))
    if method == "POST" and endpoint == "/containers/create":
        check_create(rules, body)
        return allow(frozenset())  # no `name`: Docker names it, nobody squats a name
    raise Denied(f"{method} {endpoint} is not something a sandbox needs")


def _check_list_filters(query: list[tuple[str, str]]) -> None:
    """Listing shows sandbox containers only: the filter must select the sandbox label."""
    filters = [value for name, value in query if name == "filters"]
    try:
        labels = json.loads(filters[0]).get("label", []) if len(filters) == 1 else []
    except (ValueError, AttributeError):
        labels = []
    if _SANDBOX_FILTER not in labels:
        raise Denied(f"GET /containers/json must filter on label {_SANDBOX_FILTER}")


def check_count(rules: Rules, live: int) -> None:
    """:class:`Denied` if ``live`` sandbox containers (created, running...) leave no room for
    one more."""
    if live >= rules.max_containers:
        raise Denied(
            f"{live} sandbox containers exist already (at most {rules.max_containers} at once)"
        )


def check_container(rules: Rules, inspect: Mapping[str, Any]) -> None:
    """:class:`Denied` unless the inspected container is a sandbox: created from the sandbox
    image and carrying the sandbox label (as every container created through here does)."""
    config = inspect.get("Config") or {}
    labels = config.get("Labels") or {}
    if labels.get(LABEL) != "1" or config.get("Image") != rules.image:
        raise Denied(f"container {str(inspect.get('Id', '?'))[:12]} is not a sandbox container")


# -- container creation: every field known, every hardening required -----------------------


def _is(expected: object) -> Callable[[Rules, Any], str | None]:
    return lambda rules, value: None if value == expected else f"must be {expected!r}"


def _of_type(kind: type) -> Callable[[Rules, Any], str | None]:
    def check_type(rules: Rules, value: Any) -> str | None:
        return None if type(value) is kind else f"must be a {kind.__name__}"

    return check_type


def _strings(rules: Rules, value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return None if ok else "must be a list of strings"


def _image(rules: Rules, value: Any) -> str | None:
    return None if value == rules.image else f"must be the sandbox image {rules.image!r}"


def _user(rules: Rules, value: Any) -> str | None:
    ok = isinstance(value, str) and re.fullmatch(r"[1-9]\d*:[1-9]\d*", value)
    return None if ok else "must be a non-root uid:gid"


def _labels(rules: Rules, value: Any) -> str | None:
    ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    return None if ok and value.get(LABEL) == "1" else f"must carry {LABEL}=1"


def _tmpfs(rules: Rules, value: Any) -> str | None:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return "must map paths to options"
    for target, options in value.items():
        if not {"noexec", "nosuid", "nodev"} <= set(options.split(",")):
            return f"{target} must be noexec,nosuid,nodev"
        if not any(o.startswith("size=") for o in options.split(",")):
            return f"{target} must have a size"
    return None


def _security_opt(rules: Rules, value: Any) -> str | None:
    allowed = {"no-new-privileges", "no-new-privileges:true"}
    ok = isinstance(value, list) and value and set(value) <= allowed
    return None if ok else "must be exactly no-new-privileges (no seccomp/apparmor changes)"


def _positive_int(limit: Callable[[Rules], int]) -> Callable[[Rules, Any], str | None]:
    def check_int(rules: Rules, value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit(rules)
        return None if ok else f"must be a positive integer <= {limit(rules)}"

    return check_int


def _ulimits(rules: Rules, value: Any) -> str | None:
    ok = isinstance(value, list) and all(
        isinstance(u, dict) and set(u) == {"Name", "Soft", "Hard"} for u in value
    )
    return None if ok else "must be a list of {Name, Soft, Hard}"


def _no_binds(rules: Rules, value: Any) -> str | None:
    return None if not value else "no host path may be mounted"


def _runtime(rules: Rules, value: Any) -> str | None:
    if value in (None, "", rules.runtime):
        return None
    return f"must be {rules.runtime!r}" if rules.runtime else "no runtime may be chosen"


_Check = Callable[[Rules, Any], "str | None"]
_ANY: _Check = lambda rules, value: None  # noqa: E731

#: field: (required, check). Required fields are the hardening a sandbox must have.
_CONFIG: dict[str, tuple[bool, _Check]] = {
    "Image": (True, _image),
    "Entrypoint": (False, _strings),
    "Cmd": (False, _strings),
    "Env": (False, _strings),
    "User": (True, _user),
    "WorkingDir": (False, _of_type(str)),
    "Hostname": (False, _of_type(str)),
    "NetworkDisabled": (True, _is(True)),
    "AttachStdin": (False, _of_type(bool)),
    "AttachStdout": (False, _of_type(bool)),
    "AttachStderr": (False, _of_type(bool)),
    "OpenStdin": (False, _of_type(bool)),
    "StdinOnce": (False, _of_type(bool)),
    "Tty": (False, _is(False)),
    "Labels": (True, _labels),
    "HostConfig": (True, _ANY),  # checked field by field below
}
_HOST_CONFIG: dict[str, tuple[bool, _Check]] = {
    "NetworkMode": (True, _is("none")),
    "ReadonlyRootfs": (True, _is(True)),
    "Tmpfs": (False, _tmpfs),
    "IpcMode": (True, _is("none")),
    "CgroupnsMode": (True, _is("private")),
    "CapDrop": (True, _is(["ALL"])),
    "SecurityOpt": (True, _security_opt),
    "PidsLimit": (True, _positive_int(lambda rules: rules.max_pids)),
    "Memory": (True, _positive_int(lambda rules: rules.max_memory_bytes)),
    "MemorySwap": (True, _positive_int(lambda rules: rules.max_memory_bytes)),
    "NanoCpus": (True, _positive_int(lambda rules: 64 * 10**9)),
    "Ulimits": (False, _ulimits),
    "LogConfig": (True, _is({"Type": "none", "Config": {}})),
    "Binds": (False, _no_binds),
    "Runtime": (False, _runtime),
}


def check_create(rules: Rules, body: bytes) -> None:
    """:class:`Denied` unless ``body`` creates a hardened sandbox container: every field
    known and allowed, every hardening field present (see the tables above)."""
    try:
        config = json.loads(body)
    except ValueError as exc:
        raise Denied(f"container config is not JSON: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("HostConfig"), dict):
        raise Denied("container config must be an object with a HostConfig")
    host = config["HostConfig"]
    # Unknown fields first, at both levels: the message names `Privileged`, `Mounts`...
    for prefix, fields, table in (("", config, _CONFIG), ("HostConfig.", host, _HOST_CONFIG)):
        if unknown := [name for name in fields if name not in table]:
            raise Denied(f"{prefix}{unknown[0]} is not allowed")
    for prefix, fields, table in (("", config, _CONFIG), ("HostConfig.", host, _HOST_CONFIG)):
        for name, (required, validate) in table.items():
            if name not in fields:
                if required:
                    raise Denied(f"{prefix}{name} is required")
            elif (problem := validate(rules, fields[name])) is not None:
                raise Denied(f"{prefix}{name} {problem}")
    if host["MemorySwap"] != host["Memory"]:
        raise Denied("HostConfig.MemorySwap must equal HostConfig.Memory (no swap)")
