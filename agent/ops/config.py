"""The agent's configuration: one frozen tree, read once at start-up from TOML and the environment.

Every setting has a default, so ``sct-agent run`` works without a file. This module holds the sections, their
defaults and their checks; :mod:`agent.ops.config_loader` reads them. Precedence, lowest first: the defaults
below, the TOML file (``/etc/sct-agent/agent.toml`` in production; ``systemd/agent.toml`` documents every key),
then environment variables ``SCT_AGENT_<SECTION>_<KEY>`` (``SCT_AGENT_PUBLISH_ENDPOINT=tcp://...``), because a
container or a systemd drop-in changes one value without editing the site's file.

Relative paths: a path written in the file is taken relative to the file's folder (a config travels with the
folders it names); a default or an environment value is taken relative to the current directory. ``load_config``
returns every path absolute, so a later ``chdir`` cannot change what the agent reads or writes.

One module on purpose: every section, its defaults and its checks side by side, so that the loader's schema
(derived from these classes), ``systemd/agent.toml`` and the checks cannot drift apart.

A bad value stops start-up with a :class:`ConfigError` naming ``section.key``, where it came from, the value found
and what is expected: a typo found at start-up costs a minute, found during a surgery it costs the sCT.

One module on purpose: every section, its defaults and its checks side by side, because the loader derives the
whole schema from this one module and IT reads one file to learn what each key accepts.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from agent.publish.endpoints import default_snapshot_endpoint
from agent.vocabulary import FileNames, LogFormat
from sct_core.errors import SctError

if TYPE_CHECKING:
    from engines.backends.remote_link import RemoteCallObserver, RemoteLink

#: Prefix of the environment overrides: ``SCT_AGENT_<SECTION>_<KEY>``.
ENV_PREFIX = "SCT_AGENT_"
OBSERVERS = ("native", "polling")
#: ZeroMQ transports the publisher may bind (``pgm``/``epgm`` multicast is not for a hospital network).
ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")
SECURITY_MODES = ("auto", "curve", "plain")
#: DICOM AE titles are at most 16 characters; series numbers are IS values (we keep them well inside).
AE_TITLE_MAX = 16
SERIES_NUMBER_MAX = 100_000
#: Bounds of ``receive.max_pdu_bytes`` (PS3.8: a maximum length below 4096 is not useful, above 2**32-1 not valid).
MIN_PDU_BYTES = 4096
MAX_PDU_BYTES = 2**32 - 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The shipped model halves the slab depth three times; the engine re-checks against the loaded manifest.
SLAB_DEPTH_MULTIPLE = 8
MAX_PORT = 65535
SECONDS_PER_DAY = 86_400
#: Units of the ``retention`` sizes (decimal, as disks are sold and ``df -H`` counts).
MB = 1_000_000
GB = 1_000_000_000


class ConfigError(SctError, ValueError):
    """A configuration value the agent cannot start with; the fields say which, from where and what is wanted."""

    def __init__(
        self,
        key: str,
        found: object,
        expected: str,
        *,
        source: str | None = None,
        note: str | None = None,
        what: str = "",
    ) -> None:
        self.source = source
        self.note = note
        self.what = what
        where = f" ({source})" if source else ""
        tail = f"; {note}" if note else ""
        super().__init__(
            f"{key}{where}: found {what}{_show(found)}, expected {expected}{tail}",
            attribute=key,
            found=found,
            expected=expected,
        )

    def from_source(self, source: str) -> ConfigError:
        """The same error, saying which file or environment variable the value came from."""
        return ConfigError(
            self.attribute, self.found, self.expected, source=source, note=self.note, what=self.what
        )


class TomlSyntaxError(ConfigError):
    """The file is not valid TOML; ``line`` is 1-based, None when tomllib gave no position."""

    def __init__(self, path: Path, message: str, line: int | None) -> None:
        super().__init__("config file", str(path), "valid TOML", source=str(path), note=message)
        self.path = path
        self.line = line
        where = f"line {line}" if line is not None else "unknown line"
        self.args = (f"{path}: {where}: TOML syntax error: {message}",)


def _show(value: object) -> str:
    if isinstance(value, str | Path):
        return repr(str(value))
    if isinstance(value, bool | int | float):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def _positive(key: str, value: float, unit: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(key, value, f"a finite number of {unit} greater than 0")


def _non_negative_int(key: str, value: int, meaning: str) -> None:
    if value < 0:
        raise ConfigError(key, value, f"an integer >= 0 ({meaning})")


def split_listen(listen: str, off: str = "metrics off", example: str = "127.0.0.1:9108") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6 address]:port"`` as (host, port); raises ValueError saying what is wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"a 'host:port' address such as '{example}' ('' = {off})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 host in brackets, such as '[::1]:9108'")
    if not host or any(ch.isspace() for ch in host):
        raise ValueError("a 'host:port' address with a host name or address before the ':'")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > MAX_PORT:
        raise ValueError(f"a port from 0 to {MAX_PORT} after the ':' (0 = any free port)")
    return host, int(port_text)


#: Host names that are the loopback interface whatever the resolver says.
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; any other name counts as the network (what it resolves to
    can change), and so do the wildcards ``0.0.0.0`` and ``::``."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class ServerAddress:
    """What a section with ``listen = "host:port"`` (a server the agent runs; "" = off) has in common: the
    check of the address at start-up and the host and port to bind, with one wording for every server."""

    __slots__ = ()
    listen: str
    #: The section's name in messages ("metrics", ...), what ``listen = ""`` means, and an example address.
    SECTION: ClassVar[str]
    OFF: ClassVar[str]
    EXAMPLE: ClassVar[str]

    def _check_listen(self) -> None:
        if self.listen:
            try:
                split_listen(self.listen, off=self.OFF, example=self.EXAMPLE)
            except ValueError as exc:
                raise ConfigError(f"{self.SECTION}.listen", self.listen, str(exc)) from None

    @property
    def enabled(self) -> bool:
        return self.listen != ""

    @property
    def host(self) -> str:
        """The address to bind, without IPv6 brackets; ValueError when the server is off."""
        return self._address()[0]

    @property
    def port(self) -> int:
        """The port to bind; 0 = any free port. ValueError when the server is off."""
        return self._address()[1]

    @property
    def loopback(self) -> bool:
        """Only this machine can connect (see :func:`is_loopback_host`)."""
        return is_loopback_host(self.host)

    def _address(self) -> tuple[str, int]:
        if not self.enabled:
            raise ValueError(f"{self.SECTION}.listen is '' ({self.OFF}): there is no address to bind")
        return split_listen(self.listen, off=self.OFF, example=self.EXAMPLE)


@dataclass(frozen=True, slots=True)
class WatchConfig:
    """The scanner's export folder and how to notice new files in it."""

    folder: Path = Path("export")
    #: "native" = inotify events; "polling" = rescans, needed on CIFS/NFS shares, which send no inotify events.
    observer: str = "native"
    poll_interval_s: float = 0.25
    recursive: bool = True

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ConfigError("watch.observer", self.observer, " or ".join(map(repr, OBSERVERS)))
        _positive("watch.poll_interval_s", self.poll_interval_s, "seconds")


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where the journal and the engine cache live; the only folder the agent writes besides its outputs."""

    folder: Path = Path("var")


@dataclass(frozen=True, slots=True)
class AssemblyConfig:
    """Fallback end of an acquisition that does not say how many images it has, or stopped short of it."""

    quiet_period_s: float = 20.0

    def __post_init__(self) -> None:
        _positive("assembly.quiet_period_s", self.quiet_period_s, "seconds")


@dataclass(frozen=True, slots=True)
class ProtocolsConfig:
    """Which sequence protocols a series may pass."""

    #: None = the ``sequence_protocols/`` folder shipped with the agent.
    folder: Path | None = None
    #: Protocol ids to accept; empty = every protocol in the folder.
    active: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.active:
            if not name.strip():
                raise ConfigError("protocols.active", list(self.active), "protocol ids, none of them empty")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The model and the backend that runs it."""

    #: Folder holding ``manifest.json``; None = the model shipped in the package.
    model: Path | None = None
    backend: str = "auto"
    #: Intra-op threads; 0 = all cores.
    threads: int = 0
    #: Output slices per slab; 0 = the manifest's on the CPU, ``GPU_SLAB_DEPTH`` (16) on a GPU.
    slab_depth: int = 0
    #: Compiled and exported engines; None = ``<state.folder>/engine-cache``.
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        names = backend_names()
        if self.backend not in names:
            raise ConfigError("engine.backend", self.backend, "one of " + ", ".join(map(repr, names)))
        _non_negative_int("engine.threads", self.threads, "0 = all cores")
        if self.slab_depth < 0 or self.slab_depth % SLAB_DEPTH_MULTIPLE:
            raise ConfigError(
                "engine.slab_depth",
                self.slab_depth,
                f"0 (the manifest's) or a positive multiple of {SLAB_DEPTH_MULTIPLE}",
            )


@dataclass(frozen=True, slots=True)
class TritonConfig:
    """The Triton server that computes slab windows when ``engine.backend = "triton"`` (docs/scale-out.md)."""

    #: ``host:port`` of the server's gRPC endpoint (``sct-agent serve``); required with the triton backend.
    url: str = ""
    #: Patience for one window (s); a call without an answer by then counts as a timeout.
    timeout_s: float = 60.0
    #: Calls per window before it counts as failed; the wait between them doubles from ``backoff_s``.
    attempts: int = 3
    backoff_s: float = 0.5
    #: Local backend for windows the server fails ("" = none: the series fails with a clear status; "auto").
    fallback: str = ""
    #: With a fallback, the server is tried again after ``retry_s``, doubling up to ``max_retry_s`` (s).
    retry_s: float = 5.0
    max_retry_s: float = 120.0
    #: CA of the server's certificate: TLS on (required when the server is on another host).
    tls_ca_file: Path | None = None
    #: Client certificate and key, for a server that requires them (mutual TLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: File holding the server's access token (``sct-agent serve --token-file``).
    token_file: Path | None = None
    #: Agent and server on one host: windows through system shared memory instead of gRPC messages.
    shared_memory: bool = False

    def __post_init__(self) -> None:
        if self.fallback:
            names = backend_names()
            if self.fallback not in names or self.fallback == "triton":
                local = [name for name in names if name != "triton"]
                raise ConfigError(
                    "triton.fallback", self.fallback, '"" (none) or one of ' + ", ".join(map(repr, local))
                )
        self.link()  # every other value is checked where the backend reads it

    def link(self, observer: RemoteCallObserver | None = None) -> RemoteLink | None:
        """The backend's link settings (None while no url is set); ConfigError naming the key otherwise."""
        from engines.backends.remote_link import RemoteLink, RemoteLinkError  # noqa: PLC0415

        if not self.url:
            return None
        try:
            return RemoteLink(
                url=self.url,
                timeout_s=self.timeout_s,
                attempts=self.attempts,
                backoff_s=self.backoff_s,
                fallback=self.fallback,
                retry_s=self.retry_s,
                max_retry_s=self.max_retry_s,
                tls_ca_file=self.tls_ca_file,
                tls_cert_file=self.tls_cert_file,
                tls_key_file=self.tls_key_file,
                token_file=self.token_file,
                shared_memory=self.shared_memory,
                observer=observer,
            )
        except RemoteLinkError as error:
            raise ConfigError(error.attribute, error.found, error.expected) from None


@dataclass(frozen=True, slots=True)
class PublishConfig:
    """The ZeroMQ sockets navigation systems use: the broadcast PUB and the snapshot ROUTER (docs/protocol.md)."""

    endpoint: str = "tcp://127.0.0.1:5556"
    #: Where late and resynchronising subscribers ask for the current state; "" = derived from ``endpoint``
    #: (see :func:`default_snapshot_endpoint`).
    snapshot_endpoint: str = ""
    #: Finished volumes a snapshot replays (the slabs of series still streaming are always replayed).
    snapshot_volumes: int = 2
    #: "auto" = CURVE whenever an endpoint is reachable from other machines, plain on loopback; "curve" =
    #: always; "plain" = never (off loopback only by this explicit choice, logged as a warning at start).
    security: str = "auto"
    #: The publisher's secret key (a .key_secret file from `sct-agent keys server`); not readable by others.
    secret_key_file: Path | None = None
    #: Folder of the public keys (.key files) of the subscribers allowed in.
    allowed_keys_folder: Path | None = None
    #: A heartbeat goes out after this long without another message, so subscribers can tell idle from dead.
    heartbeat_s: float = 1.0
    #: Messages queued per subscriber before ZeroMQ drops for that subscriber (a slow robot never blocks us;
    #: it sees a sequence gap and resynchronises from a snapshot).
    send_hwm: int = 32

    def __post_init__(self) -> None:
        _check_endpoint("publish.endpoint", self.endpoint)
        if self.snapshot_endpoint:
            _check_endpoint("publish.snapshot_endpoint", self.snapshot_endpoint)
            if self.snapshot_endpoint == self.endpoint and not self.endpoint.endswith(":0"):
                raise ConfigError(
                    "publish.snapshot_endpoint",
                    self.snapshot_endpoint,
                    "an endpoint other than publish.endpoint",
                )
        if self.snapshot_volumes < 1:
            raise ConfigError("publish.snapshot_volumes", self.snapshot_volumes, "an integer >= 1 (volumes)")
        if self.security not in SECURITY_MODES:
            raise ConfigError("publish.security", self.security, " or ".join(map(repr, SECURITY_MODES)))
        _positive("publish.heartbeat_s", self.heartbeat_s, "seconds")
        if self.send_hwm <= 0:
            raise ConfigError("publish.send_hwm", self.send_hwm, "an integer > 0 (messages)")

    @property
    def snapshot(self) -> str:
        """The snapshot endpoint to bind: the configured one, or the documented default."""
        return self.snapshot_endpoint or default_snapshot_endpoint(self.endpoint)


def _check_endpoint(key: str, endpoint: str) -> None:
    scheme = next((s for s in ENDPOINT_SCHEMES if endpoint.startswith(s)), None)
    if scheme is None or len(endpoint) == len(scheme):
        raise ConfigError(
            key,
            endpoint,
            "a ZeroMQ endpoint such as 'tcp://127.0.0.1:5556' ("
            + ", ".join(f"{s}..." for s in ENDPOINT_SCHEMES)
            + ")",
        )


@dataclass(frozen=True, slots=True)
class DicomConfig:
    """The sCT DICOM CT series written for each finished volume, and its optional C-STORE."""

    #: Write the series at all; false = no DICOM output (the only way to turn it off: an empty ``folder`` means
    #: the default folder, as every optional path does).
    enabled: bool = True
    #: Folder the series are written to (one sub-folder per series, appearing whole); None = ``<state>/dicom``
    #: (:attr:`AgentConfig.dicom_folder`).
    folder: Path | None = None
    #: DICOM peer the series are sent to, as "AE_TITLE@host:port"; "" = none.
    store_peer: str = ""
    #: Our AE title in the association.
    calling_ae: str = "SCT-EDGE"
    #: Associations tried per series before giving up (the series stays in the folder).
    store_attempts: int = 3
    #: Seconds before the first retry; doubled for each further one.
    store_backoff_s: float = 2.0
    #: Seconds the peer may take to accept the connection, answer the association request and confirm each
    #: instance; a peer that hangs fails the attempt after this long instead of holding the series for ever.
    store_timeout_s: float = 30.0
    #: The sCT series number is the MR's plus this.
    series_number_offset: int = 1000

    def __post_init__(self) -> None:
        if self.store_peer:
            from agent.dicom_out.c_store import StorePeer  # noqa: PLC0415 - pynetdicom only when C-STORE is configured

            try:
                StorePeer.parse(self.store_peer)
            except ValueError as error:
                raise ConfigError("dicom.store_peer", self.store_peer, str(error)) from None
            if not self.enabled:
                raise ConfigError(
                    "dicom.enabled",
                    False,
                    "true: C-STORE sends the series written to dicom.folder (dicom.store_peer is set)",
                )
        if not (0 < len(self.calling_ae) <= AE_TITLE_MAX and self.calling_ae.isascii()):
            raise ConfigError("dicom.calling_ae", self.calling_ae, f"1 to {AE_TITLE_MAX} ASCII characters")
        if self.store_attempts < 1:
            raise ConfigError("dicom.store_attempts", self.store_attempts, "an integer >= 1")
        _positive("dicom.store_backoff_s", self.store_backoff_s, "seconds")
        _positive("dicom.store_timeout_s", self.store_timeout_s, "seconds")
        if not 1 <= self.series_number_offset < SERIES_NUMBER_MAX:
            raise ConfigError(
                "dicom.series_number_offset",
                self.series_number_offset,
                f"an integer from 1 to {SERIES_NUMBER_MAX - 1}",
            )


def _check_ae_title(key: str, title: str) -> None:
    """1 to 16 printable ASCII characters, no backslash, not only spaces (PS3.5 §6.2, AE)."""
    if not (
        title.strip()
        and len(title) <= AE_TITLE_MAX
        and title.isascii()
        and title.isprintable()
        and "\\" not in title
    ):
        raise ConfigError(key, title, f"1 to {AE_TITLE_MAX} printable ASCII characters, no backslash")


@dataclass(frozen=True, slots=True)
class ReceiveConfig(ServerAddress):
    """DICOM C-STORE receive: a storage SCP the scanner (or a PACS router) pushes MR series to
    (agent.ingest.store_scp). Off unless ``listen`` is set."""

    #: "host:port" to listen on ("0.0.0.0:11112"; "[::]:11112" for IPv6; port 0 = any free port); "" = off.
    SECTION: ClassVar[str] = "receive"
    OFF: ClassVar[str] = "receive off"
    EXAMPLE: ClassVar[str] = "0.0.0.0:11112"

    listen: str = ""
    #: Our AE title: the called AE title the scanner's DICOM node must name.
    ae_title: str = "SCT_AGENT"
    #: Refuse an association whose called AE title is not ``ae_title`` (a scanner node aimed at another AE).
    check_called_ae_title: bool = True
    #: Calling AE titles allowed in; empty = any.
    allowed_calling_ae_titles: tuple[str, ...] = ()
    #: Peer addresses or networks (CIDR) allowed in, e.g. "10.20.1.15" or "10.20.1.0/24"; empty = any.
    allowed_addresses: tuple[str, ...] = ()
    #: Associations at once; one more is refused as "local limit exceeded" (transient), the sender retries.
    max_associations: int = 4
    #: Seconds to wait for an association request, release or abort (ACSE).
    acse_timeout_s: float = 30.0
    #: Seconds to wait for the next DIMSE message within an association.
    dimse_timeout_s: float = 60.0
    #: Seconds without any traffic after which an association is aborted.
    network_timeout_s: float = 60.0
    #: The largest PDU we accept, in bytes (0 = no limit); larger PDUs cost fewer round trips per image.
    max_pdu_bytes: int = 262_144
    #: MB that must stay free on the received folder's filesystem; below it an instance is refused with
    #: "out of resources" (0xA700) and the scanner keeps it and retries. 0 = no check (a full disk still
    #: refuses).
    min_free_mb: float = 256.0

    def __post_init__(self) -> None:
        self._check_listen()
        _check_ae_title("receive.ae_title", self.ae_title)
        for title in self.allowed_calling_ae_titles:
            _check_ae_title("receive.allowed_calling_ae_titles", title)
        self.networks()
        if (
            self.listen
            and not self.loopback
            and not (self.allowed_addresses or self.allowed_calling_ae_titles)
        ):
            raise ConfigError(
                "receive.allowed_addresses",
                [],
                "the scanner's address or network (or receive.allowed_calling_ae_titles) when receive.listen is "
                "reachable from other machines",
                note="an open storage SCP lets anyone on the network inject images",
            )
        if self.max_associations < 1:
            raise ConfigError("receive.max_associations", self.max_associations, "an integer >= 1")
        for key in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
            _positive(f"receive.{key}", getattr(self, key), "seconds")
        if self.max_pdu_bytes != 0 and not MIN_PDU_BYTES <= self.max_pdu_bytes <= MAX_PDU_BYTES:
            raise ConfigError(
                "receive.max_pdu_bytes",
                self.max_pdu_bytes,
                f"0 (no limit) or {MIN_PDU_BYTES} to {MAX_PDU_BYTES} bytes",
            )
        if not (math.isfinite(self.min_free_mb) and self.min_free_mb >= 0):
            raise ConfigError("receive.min_free_mb", self.min_free_mb, "a finite number >= 0 (0 = no check)")

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``allowed_addresses`` parsed (an address is a network of one); ConfigError naming a bad entry."""
        parsed = []
        for entry in self.allowed_addresses:
            try:
                parsed.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    "receive.allowed_addresses",
                    entry,
                    "IP addresses or networks such as '10.20.1.15' or '10.20.1.0/24' (no host names: a name's "
                    "address can change under an allow-list)",
                ) from None
        return tuple(parsed)


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How much and how long the agent keeps of what it writes, and the free space it keeps for a new series.

    Sizes and ages bound the sCT DICOM folder, the volume archive (``<state>/snapshot``) and the journal's
    detail rows; 0 = unbounded. Below ``min_free_mb`` free on the state or the DICOM folder's filesystem the
    agent takes no new acquisition (agent.ops.disk_space); 0 = no check.
    """

    #: Seconds between pruning runs (one also runs at start and whenever free space drops below min_free_mb).
    interval_s: float = 600.0
    dicom_max_age_days: float = 30.0
    dicom_max_size_gb: float = 50.0
    snapshot_max_age_days: float = 7.0
    snapshot_max_size_gb: float = 2.0
    journal_max_age_days: float = 90.0
    journal_max_size_mb: float = 512.0
    #: Images received by C-STORE (``<state>/received``), by series folder; never one changed in the last hour.
    received_max_age_days: float = 7.0
    received_max_size_gb: float = 20.0
    min_free_mb: float = 1024.0

    def __post_init__(self) -> None:
        _positive("retention.interval_s", self.interval_s, "seconds")
        for key in (
            "dicom_max_age_days",
            "dicom_max_size_gb",
            "snapshot_max_age_days",
            "snapshot_max_size_gb",
            "journal_max_age_days",
            "journal_max_size_mb",
            "received_max_age_days",
            "received_max_size_gb",
            "min_free_mb",
        ):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"retention.{key}", value, "a finite number >= 0 (0 = unbounded)")

    @staticmethod
    def age_seconds(days: float) -> float | None:
        """An age bound in seconds; None when unbounded (0)."""
        return days * SECONDS_PER_DAY if days > 0 else None

    @staticmethod
    def size_bytes(size: float, unit: int) -> int | None:
        """A size bound in bytes (``unit``: MB or GB); None when unbounded (0)."""
        return int(size * unit) if size > 0 else None


@dataclass(frozen=True, slots=True)
class MetricsConfig(ServerAddress):
    """Prometheus exposition; ``listen = ""`` turns it off."""

    SECTION: ClassVar[str] = "metrics"
    OFF: ClassVar[str] = "metrics off"
    EXAMPLE: ClassVar[str] = "127.0.0.1:9108"

    listen: str = "127.0.0.1:9108"

    def __post_init__(self) -> None:
        self._check_listen()


#: How the status page authenticates a person (agent.status_page.access).
PAGE_AUTH_MODES = ("none", "basic", "token")


@dataclass(frozen=True, slots=True)
class StatusPageConfig(ServerAddress):
    """The technologist's status page: its HTTP address and who may read it (agent.status_page).

    Off loopback the page needs TLS and authentication; the files are checked when the server starts (they must
    exist, load, and be private: agent.status_page.access), not here, so that a config can be built and printed on
    a machine that does not hold them.
    """

    #: "host:port" as ``metrics.listen``; "" = no status page.
    SECTION: ClassVar[str] = "status_page"
    OFF: ClassVar[str] = "no status page"
    EXAMPLE: ClassVar[str] = "127.0.0.1:9110"

    listen: str = "127.0.0.1:9110"
    #: PEM certificate (chain) and its unencrypted private key; both or neither. None = plain HTTP.
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    #: "none" (loopback only), "basic" (users file of salted PBKDF2 hashes) or "token" (a token file).
    auth: str = "none"
    basic_users_file: Path | None = None
    token_file: Path | None = None
    #: Event streams (open browser tabs) served at once; one more gets 503.
    max_clients: int = 16
    #: Hours an acquisition stays on the page after its first image (the board also keeps at most a fixed count).
    history_hours: float = 12.0

    def __post_init__(self) -> None:
        self._check_listen()
        if self.auth not in PAGE_AUTH_MODES:
            raise ConfigError("status_page.auth", self.auth, " or ".join(map(repr, PAGE_AUTH_MODES)))
        if self.max_clients < 1:
            raise ConfigError("status_page.max_clients", self.max_clients, "an integer >= 1 (event streams)")
        if not (math.isfinite(self.history_hours) and self.history_hours > 0):
            raise ConfigError("status_page.history_hours", self.history_hours, "a number of hours > 0")
        if (self.tls_certificate is None) != (self.tls_key is None):
            missing = "status_page.tls_key" if self.tls_key is None else "status_page.tls_certificate"
            raise ConfigError(missing, "", "a file: TLS needs both tls_certificate and tls_key")
        if self.auth == "basic" and self.basic_users_file is None:
            raise ConfigError(
                "status_page.basic_users_file",
                "",
                "a users file with auth = 'basic' (create it with `sct-agent page-user NAME`)",
            )
        if self.auth == "token" and self.token_file is None:
            raise ConfigError(
                "status_page.token_file",
                "",
                "a token file with auth = 'token' (create it with `sct-agent page-token`)",
            )
        if self.enabled and not self.loopback:
            if not self.tls:
                raise ConfigError(
                    "status_page.tls_certificate",
                    "",
                    f"a certificate and key: {self.listen} is reachable from other machines, so the page needs TLS "
                    f"(status_page.tls_certificate and status_page.tls_key)",
                )
            if self.auth == "none":
                raise ConfigError(
                    "status_page.auth",
                    self.auth,
                    f"'basic' or 'token': {self.listen} is reachable from other machines, so the page needs "
                    f"authentication",
                )

    @property
    def tls(self) -> bool:
        return self.tls_certificate is not None


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """Bounds between stages: a slow stage applies back-pressure instead of growing memory."""

    queue_depth: int = 64

    def __post_init__(self) -> None:
        if self.queue_depth <= 0:
            raise ConfigError("pipeline.queue_depth", self.queue_depth, "an integer > 0 (items per queue)")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """What is logged and how: the journal's priorities under systemd, JSON lines for log shippers, text for a
    terminal; files named by a hash, never by a name a console may have made of the patient's."""

    #: Least severe level of the agent's own loggers (``agent``, ``engines``, ``sct_core``).
    level: str = "INFO"
    #: "auto" (journal when stderr is the systemd journal, else text), "text", "json" or "journal".
    format: str = "auto"
    #: Per-logger levels, "name=LEVEL" (e.g. "agent.ingest.watcher=DEBUG", "pynetdicom=INFO"). Loggers of
    #: other libraries stay at WARNING unless listed: watchdog logs paths and pynetdicom UIDs at DEBUG.
    loggers: tuple[str, ...] = ()
    #: How a file of the export folder is named: "hash" (file:<10 hex digits>) or "relative" (its path there).
    file_names: str = "hash"

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise ConfigError("logging.level", self.level, "one of " + ", ".join(LOG_LEVELS))
        formats = [str(f) for f in LogFormat]
        if self.format not in formats:
            raise ConfigError("logging.format", self.format, " or ".join(map(repr, formats)))
        self.logger_levels()
        names = [str(n) for n in FileNames]
        if self.file_names not in names:
            raise ConfigError("logging.file_names", self.file_names, " or ".join(map(repr, names)))

    def logger_levels(self) -> dict[str, str]:
        """``loggers`` as logger name -> level; ConfigError naming the entry that is not "name=LEVEL"."""
        levels: dict[str, str] = {}
        for entry in self.loggers:
            name, sep, level = entry.partition("=")
            name, level = name.strip(), level.strip().upper()
            if not sep or not name or level not in LOG_LEVELS:
                raise ConfigError(
                    "logging.loggers",
                    entry,
                    "entries 'logger.name=LEVEL' with LEVEL one of " + ", ".join(LOG_LEVELS),
                )
            levels[name] = level
        return levels


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The whole configuration; one attribute per TOML section."""

    watch: WatchConfig = field(default_factory=WatchConfig)
    state: StateConfig = field(default_factory=StateConfig)
    assembly: AssemblyConfig = field(default_factory=AssemblyConfig)
    protocols: ProtocolsConfig = field(default_factory=ProtocolsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    receive: ReceiveConfig = field(default_factory=ReceiveConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    status_page: StatusPageConfig = field(default_factory=StatusPageConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.engine.backend == "triton" and not self.triton.url:
            raise ConfigError(
                "triton.url",
                "",
                'host:port of the Triton server (sct-agent serve) when engine.backend = "triton"',
            )

    #: Name of the folder under ``state.folder`` that holds engine caches when ``engine.cache_dir`` is unset.
    ENGINE_CACHE_NAME: ClassVar[str] = "engine-cache"

    @property
    def engine_cache_dir(self) -> Path:
        """``engine.cache_dir``, or its documented default under the state folder."""
        if self.engine.cache_dir is not None:
            return self.engine.cache_dir
        return self.state.folder / self.ENGINE_CACHE_NAME

    #: Name of the folder under ``state.folder`` that holds the sCT DICOM series when ``dicom.folder`` is unset.
    DICOM_FOLDER_NAME: ClassVar[str] = "dicom"

    @property
    def dicom_folder(self) -> Path | None:
        """Where the sCT DICOM series go: ``dicom.folder``, or its default under the state folder; None when
        ``dicom.enabled`` is false."""
        if not self.dicom.enabled:
            return None
        if self.dicom.folder is not None:
            return self.dicom.folder
        return self.state.folder / self.DICOM_FOLDER_NAME

    #: Name of the folder under ``state.folder`` where instances received by C-STORE are kept (agent.ingest.store_scp).
    RECEIVED_FOLDER_NAME: ClassVar[str] = "received"

    @property
    def received_folder(self) -> Path:
        """Where C-STORE writes what it receives: ``<state.folder>/received`` (the agent's state, never the
        scanner's export folder)."""
        return self.state.folder / self.RECEIVED_FOLDER_NAME


def backend_names() -> tuple[str, ...]:
    """``auto`` and the registered backends, as ``engine.backend`` accepts them.

    Imported here rather than at module level because the registry imports torch (a second or more): the CLI's
    other subcommands and the tests that build configs only pay for it when an engine config is checked.
    """
    from engines.backends.registry import AUTO, BACKENDS  # noqa: PLC0415 - heavy import, see docstring

    return (AUTO, *BACKENDS)
