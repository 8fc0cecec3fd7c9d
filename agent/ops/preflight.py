"""Preflight checks of what the agent needs from its own files before it starts: the configuration, the protocol
files, the model, the engine cache, the CURVE keys and the status page's TLS and credential files (``sct-agent doctor``; the machine's side, ports, folders,
free space and the systemd unit, is :mod:`agent.ops.preflight_host`).

Why a separate command: ``sct-agent run`` stops at the first problem, and only after seconds of loading; hospital
IT installing the box, or wondering why the service restarts, wants every problem at once, each on one line
naming the setting, the value found and what is expected. So each check here is a function that returns
:class:`Check` results instead of raising, and reuses the very code the agent starts with (the config loader,
the protocol parser, the manifest's weights check, ``publish_security``, the engine cache's key and checks), so
that the doctor and the agent cannot disagree.

The levels: FAIL means the agent will refuse to start, or will start and not do its job (no protocol the model
may run for); WARN means it starts but something is slow (an engine to build), fragile or risky (a secret key a
group can read); OK says what was found. Nothing here builds an engine, writes a file or binds a socket for
longer than the check.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Final

from agent.ops.config import AgentConfig, ConfigError
from agent.ops.config_loader import SECTIONS, env_name, load_config
from agent.publish.security import exposed_endpoints, publish_security
from agent.status_page.access import Authenticator, server_tls_context
from agent.validation.protocol_files import (
    PROTOCOL_SUFFIX,
    SHIPPED_PROTOCOLS_DIR,
    load_protocol,
    load_protocols,
)
from agent.validation.protocols import ProtocolError, SequenceProtocol
from engines.backends.base import BackendOptions, BackendUnavailableError
from engines.backends.cached_backend import MISSING, REFUSED, CachedEngineState
from engines.backends.registry import inspect_engine
from engines.inference.engine import SctEngine, default_slab_depth
from engines.model.manifest import DEFAULT_MODEL_DIR, ManifestError, ModelManifest

#: Where the production unit reads its configuration (systemd/sct-agent.service).
PRODUCTION_CONFIG: Final = Path("/etc/sct-agent/agent.toml")
#: How long building an engine takes when this machine has no record of an earlier build: (seconds, basis).
#: Measured with the shipped model's window (docs/gpu.md); None where not measured yet.
BUILD_ESTIMATES: Final[Mapping[str, tuple[float | None, str]]] = {
    "torch-aot": (
        90.0,
        "81 to 104 s measured on 2 CPU cores, acceptance phantom included; less with more cores",
    ),
    "torch-cuda": (75.0, "65 s compile, 72.6 s to ready measured on an H200"),
    "tensorrt": (None, "not measured yet; expect minutes"),
}
#: What a backend without a cached engine does at every start (docs/model.md, docs/gpu.md).
UNCACHED_BACKENDS: Final[Mapping[str, str]] = {
    "torch-eager": "runs the model eagerly: nothing to build, the slowest backend per slab",
    "torch-optimised": "compiles with torch.compile at every start (23 to 50 s on 2 cores); nothing is cached ahead",
    "onnxruntime": "exports an ONNX file at its first start and reuses it from the cache after that",
    "triton": "windows computed by the Triton server in [triton] url; its model identity is checked at start",
}
#: Permission bits that let the secret key file's group read or change it.
_GROUP_ACCESS: Final = stat.S_IRGRP | stat.S_IWGRP
#: Folders the shipped unit has systemd create at start (StateDirectory=, CacheDirectory=): missing before the
#: first start is expected, and the service user could not create them itself.
SYSTEMD_MANAGED_FOLDERS: Final = (Path("/var/lib/sct-agent"), Path("/var/cache/sct-agent"))
#: The environment variables that override a setting (``SCT_AGENT_<SECTION>_<KEY>``).
_SETTING_VARIABLES: Final = frozenset(
    env_name(section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)
)


class Status(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the doctor's report."""

    #: The group of checks: config, protocols, model, engine, keys, status page, ports, export folder, free space,
    #: systemd.
    name: str
    status: Status
    #: What the line is about: a setting (``section.key``) or a file.
    attribute: str
    #: The value found and, where it is not OK, what is expected and how to get there.
    message: str

    def line(self) -> str:
        return f"{self.status.value:<4}  {self.name:<13}  {self.attribute}: {self.message}"


def check_config(
    path: Path | None, environ: Mapping[str, str] | None = None
) -> tuple[Check, AgentConfig | None]:
    """The configuration as ``sct-agent run --config`` loads it, and the loader's own message when it cannot."""
    environ = os.environ if environ is None else environ
    attribute = str(path) if path is not None else "--config"
    try:
        config = load_config(path, environ)
    except ConfigError as error:
        return Check("config", Status.FAIL, attribute, str(error)), None
    overrides = sorted(name for name in environ if name in _SETTING_VARIABLES)
    tail = f"; overridden by {', '.join(overrides)}" if overrides else ""
    if path is not None:
        return Check("config", Status.OK, attribute, f"loads{tail}"), config
    if PRODUCTION_CONFIG.exists():
        return Check(
            "config",
            Status.WARN,
            attribute,
            f"none given: the built-in defaults are checked{tail}, but the service reads {PRODUCTION_CONFIG}; "
            f"expected --config {PRODUCTION_CONFIG}",
        ), config
    return Check("config", Status.OK, attribute, f"none given: the built-in defaults are used{tail}"), config


def check_model(config: AgentConfig) -> tuple[Check, ModelManifest | None]:
    """The manifest loads and the weights' sha256 is the manifest's (the weights file is read once)."""
    folder = config.engine.model
    attribute = "engine.model"
    where = str(folder) if folder is not None else f"'' (the shipped model, {DEFAULT_MODEL_DIR})"
    try:
        manifest = ModelManifest.load(folder or DEFAULT_MODEL_DIR)
    except ManifestError as error:
        return Check("model", Status.FAIL, attribute, f"{where}: {error}"), None
    return Check(
        "model",
        Status.OK,
        attribute,
        f"{where}: {manifest.label}, {manifest.weights_file} sha256 {manifest.weights_sha256[:12]}... matches "
        f"the manifest",
    ), manifest


def check_protocols(config: AgentConfig, manifest: ModelManifest | None) -> list[Check]:
    """Every protocol file parses, every active id exists, and the model may run for at least one active one."""
    folder = config.protocols.folder or SHIPPED_PROTOCOLS_DIR
    where = "protocols.folder"
    if not folder.is_dir():
        return [
            Check(
                "protocols",
                Status.FAIL,
                where,
                f"found no folder {folder}; expected a folder of *{PROTOCOL_SUFFIX} protocol files",
            )
        ]
    files = sorted(folder.glob(f"*{PROTOCOL_SUFFIX}"))
    if not files:
        return [
            Check(
                "protocols",
                Status.FAIL,
                where,
                f"found no *{PROTOCOL_SUFFIX} files in {folder}; expected at least one protocol",
            )
        ]
    checks: list[Check] = []
    parsed: list[SequenceProtocol] = []
    for path in files:
        try:
            parsed.append(load_protocol(path))
        except ProtocolError as error:
            checks.append(Check("protocols", Status.FAIL, str(path), f"does not parse: {error.problem}"))
    if parsed:
        checks.append(
            Check(
                "protocols",
                Status.OK,
                where,
                f"{folder}: {len(parsed)} of {len(files)} files parse ({', '.join(p.id for p in parsed)})",
            )
        )
    active = config.protocols.active
    if len(parsed) < len(files):
        checks.append(
            Check(
                "protocols",
                Status.WARN,
                "protocols.active",
                "not checked: the agent reads every file in the folder, and one above does not parse",
            )
        )
        return checks
    try:
        selected = load_protocols(folder, active)
    except ProtocolError as error:
        checks.append(
            Check("protocols", Status.FAIL, "protocols.active", f"{error.attribute}: {error.problem}")
        )
        return checks
    ids = [p.id for p in selected]
    checks.append(
        Check(
            "protocols",
            Status.OK,
            "protocols.active",
            f"{ids}" if active else f"[] = every protocol in the folder: {', '.join(ids)}",
        )
    )
    checks.append(_model_protocols(manifest, ids))
    return checks


def _model_protocols(manifest: ModelManifest | None, active: list[str]) -> Check:
    attribute = "validated_protocols"
    if manifest is None:
        return Check("protocols", Status.WARN, attribute, "not checked: the model did not load (see model)")
    runs_for = [p for p in active if p in manifest.validated_protocols]
    if not runs_for:
        return Check(
            "protocols",
            Status.FAIL,
            attribute,
            f"the model {manifest.label} is validated for {list(manifest.validated_protocols)}, none of them "
            f"active ({active}); expected at least one in protocols.active, or the agent judges series but "
            f"never runs the model",
        )
    return Check(
        "protocols", Status.OK, attribute, f"the model {manifest.label} runs for {', '.join(runs_for)}"
    )


def check_engine_cache_dir(config: AgentConfig) -> Check:
    """The engine cache folder exists and is writable, or can be created by this user."""
    folder = config.engine_cache_dir
    attribute = "engine.cache_dir"
    who = current_user()
    if folder.exists():
        if not folder.is_dir():
            return Check("engine", Status.FAIL, attribute, f"{folder} is not a folder; expected a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            return Check(
                "engine",
                Status.FAIL,
                attribute,
                f"{folder} is not writable by {who}; expected the service user's folder "
                f"(chown -R <service user> {folder})",
            )
        return Check("engine", Status.OK, attribute, f"{folder} exists and is writable by {who}")
    parent = nearest_existing(folder)
    if os.access(parent, os.W_OK | os.X_OK):
        return Check(
            "engine", Status.OK, attribute, f"{folder} does not exist yet; {who} can create it (in {parent})"
        )
    managed = next((m for m in SYSTEMD_MANAGED_FOLDERS if folder.is_relative_to(m) and not m.exists()), None)
    if managed is not None:
        return Check(
            "engine",
            Status.WARN,
            attribute,
            f"{folder} does not exist yet and {who} cannot create it; systemd creates {managed} for the service "
            f"user when the unit starts (StateDirectory=/CacheDirectory=); run `sct-agent engine build` after that",
        )
    return Check(
        "engine",
        Status.FAIL,
        attribute,
        f"{folder} does not exist and {who} cannot create it ({parent} is not writable); expected an existing "
        f"folder the service user owns (systemd's StateDirectory= creates /var/lib/sct-agent)",
    )


def check_triton_server(config: AgentConfig, manifest: ModelManifest) -> Check:
    """Whether the Triton server answers and serves the manifest's model; nothing is computed."""
    from engines.backends.remote_link import RemoteInferenceError, RemoteLinkError, RemoteOutcome  # noqa: PLC0415
    from engines.backends.triton_client import probe_server  # noqa: PLC0415
    from engines.serving.contract import ServedModelMismatchError  # noqa: PLC0415

    link = config.triton.link()
    if link is None:  # AgentConfig refuses this combination; kept for a hand-built config
        return Check("engine", Status.FAIL, "triton.url", 'not set, and engine.backend = "triton" needs it')
    try:
        served = probe_server(manifest, link)
    except ServedModelMismatchError as error:
        return Check("engine", Status.FAIL, "triton.url", str(error))
    except RemoteLinkError as error:
        return Check("engine", Status.FAIL, error.attribute, str(error))
    except RemoteInferenceError as error:
        status = Status.FAIL if error.outcome is RemoteOutcome.REFUSED else Status.WARN
        fallback = f"the local {link.fallback!r} fallback computes" if link.fallback else "series fail"
        return Check("engine", status, "triton.url", f"{error}; until the server answers, {fallback}")
    return Check(
        "engine",
        Status.OK,
        "triton.url",
        f"{link.url} serves {served.model_id} {served.model_version} (weights {served.weights_sha256[:16]}…, as "
        f"the manifest) on {served.engine or 'an unnamed engine'}, {'TLS' if link.tls else 'plaintext'}",
    )


def check_engine(
    config: AgentConfig, manifest: ModelManifest | None, config_path: Path | None = None
) -> Check:
    """Whether the engine the start would use is cached and accepted on this machine, or (``triton``) whether its
    server answers with the manifest's model; nothing is built or computed."""
    if manifest is not None and config.engine.backend == "triton":
        return check_triton_server(config, manifest)
    return _check_local_engine(config, manifest, config_path)


def _check_local_engine(
    config: AgentConfig, manifest: ModelManifest | None, config_path: Path | None
) -> Check:
    attribute = "engine.backend"
    if manifest is None:
        return Check("engine", Status.WARN, attribute, "not checked: the model did not load (see model)")
    backend = config.engine.backend
    options = BackendOptions(threads=config.engine.threads or None, cache_dir=config.engine_cache_dir)
    slab_depth = default_slab_depth(backend, config.engine.slab_depth or None)
    try:
        window = SctEngine(manifest, backend, options, slab_depth).window_shape(manifest.matrix)
    except ValueError as error:
        return Check("engine", Status.FAIL, "engine.slab_depth", str(error))
    try:
        choice = inspect_engine(backend, manifest, window, options)
    except BackendUnavailableError as error:
        return Check("engine", Status.FAIL, attribute, f"{backend!r}: {error}")
    chosen = f"{choice.backend} {choice.precision}" + (
        " (auto's choice here)" if backend != choice.backend else ""
    )
    if choice.cache is None:
        return Check("engine", Status.OK, attribute, f"{chosen}: {UNCACHED_BACKENDS.get(choice.backend, '')}")
    cache = choice.cache
    shape = "x".join(map(str, cache.window))
    if cache.ready:
        return Check(
            "engine",
            Status.OK,
            attribute,
            f"{chosen}: engine for window {shape} cached in {cache.folder}, {cache.state}: {cache.reason}",
        )
    why = "none cached" if cache.state == MISSING else f"the cached one would be refused: {cache.reason}"
    return Check(
        "engine",
        Status.WARN,
        attribute,
        f"{chosen}: {why}; the first start builds the engine for window {shape}, {build_estimate(cache)}, before "
        f"the agent is ready; expected a cached engine: run `sct-agent engine build"
        f"{f' --config {config_path}' if config_path is not None else ''}` as the service user now",
    )


def build_estimate(cache: CachedEngineState) -> str:
    """Roughly how long the build will take: this machine's earlier build where a record tells, else measured."""
    if cache.state == REFUSED and cache.previous_build_s is not None:
        return f"about {cache.previous_build_s:.0f} s (the refused engine's build here), more for a first acceptance"
    seconds, basis = BUILD_ESTIMATES.get(cache.backend, (None, "not measured"))
    return f"roughly {seconds / 60:.1f} minutes ({basis})" if seconds else f"time unknown ({basis})"


def check_keys(config: AgentConfig) -> list[Check]:
    """CURVE keys as the publisher loads them (``publish_security``), plus who may read the secret key."""
    publish = config.publish
    exposed = exposed_endpoints(publish)
    try:
        server = publish_security(publish)
    except ConfigError as error:
        return [Check("keys", Status.FAIL, error.attribute, str(error).removeprefix(f"{error.attribute}: "))]
    if server is None:
        if publish.security == "plain" and exposed:
            return [
                Check(
                    "keys",
                    Status.WARN,
                    "publish.security",
                    f"'plain': sCT images go unencrypted and unauthenticated on {', '.join(exposed)}; expected "
                    f"'auto' or 'curve' unless the network is dedicated and isolated",
                )
            ]
        reason = "'plain'" if publish.security == "plain" else "'auto' and both endpoints are on this machine"
        return [Check("keys", Status.OK, "publish.security", f"{reason}: CURVE off, no keys needed")]
    assert publish.secret_key_file is not None and publish.allowed_keys_folder is not None
    checks = [_secret_key_access(publish.secret_key_file)]
    checks.append(
        Check(
            "keys",
            Status.OK,
            "publish.allowed_keys_folder",
            f"{publish.allowed_keys_folder}: {len(server.allowed)} subscriber key(s) allowed",
        )
    )
    return checks


def check_status_page(config: AgentConfig) -> list[Check]:
    """The status page's certificate, key and users or token file, loaded exactly as the page's server loads them."""
    page = config.status_page
    if not page.enabled:
        return [Check("status page", Status.OK, "status_page.listen", "'' (no status page)")]
    try:
        server_tls_context(page)
        Authenticator(page)
    except ConfigError as error:
        return [
            Check(
                "status page", Status.FAIL, error.attribute, str(error).removeprefix(f"{error.attribute}: ")
            )
        ]
    scheme = "https" if page.tls else "http"
    checks = [
        Check(
            "status page", Status.OK, "status_page.listen", f"{scheme}://{page.listen}/, auth {page.auth!r}"
        )
    ]
    files = (
        ("status_page.tls_certificate", page.tls_certificate, "loads with its key (TLS 1.2 or later)"),
        ("status_page.tls_key", page.tls_key, "private"),
        (
            "status_page.basic_users_file",
            page.basic_users_file if page.auth == "basic" else None,
            "private, parses",
        ),
        (
            "status_page.token_file",
            page.token_file if page.auth == "token" else None,
            "private, a usable token",
        ),
    )
    for attribute, path, found in files:
        if path is not None:
            mode = stat.filemode(path.stat().st_mode)
            checks.append(Check("status page", Status.OK, attribute, f"{path}: {found}, mode {mode}"))
    return checks


def _secret_key_access(path: Path) -> Check:
    """What ``load_secret_key`` lets through but a careful site does not want: group access, another owner."""
    attribute = "publish.secret_key_file"
    info = path.stat()
    mode = stat.filemode(info.st_mode)
    problems = []
    if info.st_mode & _GROUP_ACCESS:
        problems.append(f"mode {mode} lets its group read or change it; expected chmod 600 {path}")
    if info.st_uid != os.geteuid():
        problems.append(
            f"owned by {user_name(info.st_uid)}, not by {current_user()} who runs this; expected the service user "
            f"to own it (chown <service user> {path})"
        )
    if problems:
        return Check("keys", Status.WARN, attribute, f"{path}: " + "; ".join(problems))
    return Check("keys", Status.OK, attribute, f"{path}: a valid key, mode {mode}, owned by {current_user()}")


def user_name(uid: int) -> str:
    import pwd  # noqa: PLC0415 - POSIX only, like the rest of the product

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def current_user() -> str:
    """Who runs the doctor: checks of access and ownership hold for this user, so run it as the service user."""
    return user_name(os.geteuid())


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what a folder would be created in)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")
