"""CURVE and the ZAP allow-list over real sockets: who gets in, who gets nothing, what is counted, and the
start-up rules for keys (sct-agent keys, world-readable secrets, plain TCP off loopback)."""

from __future__ import annotations

import contextlib
import io
import logging
import stat
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import zmq
from agent_support import agent_config, write_test_model, write_test_protocol
from wire_support import random_hu, sample_volume, wait_until

from agent.cli import keys
from agent.cli import main as cli_main
from agent.client import SctClient
from agent.ops.config import ConfigError, PublishConfig
from agent.ops.metrics import AgentMetrics
from agent.publish.curve_keys import (
    CurveClient,
    CurveServer,
    KeyFileError,
    create_key_pair,
    curve_client,
    curve_server,
    is_local_endpoint,
    load_secret_key,
)
from agent.publish.publisher import Publisher
from agent.publish.security import publish_security
from agent.service import AgentService
from sct_core.geometry import VolumeGeometry

FAST_HEARTBEAT_S = 0.05
WAIT_S = 15.0
#: How long a refused subscriber is watched for anything arriving (heartbeats go out every 50 ms).
REFUSED_WATCH_S = 1.0


pytestmark = pytest.mark.usefixtures("no_thread_leaks")


class Keys:
    """A server pair, an allowed robot and a robot not on the list, made by the product's own key code."""

    def __init__(self, root: Path) -> None:
        self.server_public, self.server_secret = create_key_pair(root / "server", "server")
        self.allowed = root / "allowed"
        robot_public, self.robot_secret = create_key_pair(root / "robots", "robot-or1")
        self.allowed.mkdir()
        (self.allowed / robot_public.name).write_bytes(robot_public.read_bytes())
        _, self.stranger_secret = create_key_pair(root / "robots", "stranger")

    def server(self) -> CurveServer:
        return curve_server(self.server_secret, self.allowed)

    def client(self, secret: Path) -> CurveClient:
        return curve_client(self.server_public, secret)


@pytest.fixture
def curve_keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@contextmanager
def curve_publisher(keys_: Keys, metrics: AgentMetrics | None = None) -> Iterator[Publisher]:
    publisher = Publisher(
        "tcp://127.0.0.1:0",
        snapshot_endpoint="tcp://127.0.0.1:0",
        curve=keys_.server(),
        heartbeat_s=FAST_HEARTBEAT_S,
        send_hwm=100,
        on_rejected=metrics.subscriber_rejected if metrics else None,
    )
    publisher.start()
    try:
        yield publisher
    finally:
        publisher.stop()


def geometry() -> VolumeGeometry:
    return VolumeGeometry(
        shape=(8, 32, 32),
        spacing=(2.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        row_direction=(0.0, 1.0, 0.0),
        column_direction=(0.0, 0.0, -1.0),
        slice_direction=(-1.0, 0.0, 0.0),
    )


def rejected_total(metrics: AgentMetrics, socket: str) -> float:
    return sum(
        metrics.registry.get_sample_value(
            "sct_agent_subscribers_rejected_total", {"socket": socket, "reason": reason}
        )
        or 0.0
        for reason in ("auth", "protocol", "handshake")
    )


# ------------------------------------------------------------------------------------------ on the wire


def test_an_allowed_subscriber_gets_the_volume_encrypted_through_publish_and_snapshot(
    curve_keys: Keys,
) -> None:
    grid = geometry()
    hu = random_hu(grid.shape, seed=11)
    with curve_publisher(curve_keys) as publisher:
        publisher.submit(sample_volume(grid, hu, slab_count=1, acquisition_id="acq-curve"))
        assert wait_until(lambda: publisher.store.volume_count == 1)
        with SctClient(
            publisher.endpoint,
            snapshot_endpoint=publisher.snapshot_endpoint,
            curve=curve_keys.client(curve_keys.robot_secret),
        ) as robot:
            volume = robot.receive_volume(WAIT_S)  # only the snapshot has it: the ROUTER speaks CURVE too
            mark = publisher.sequence
            assert robot.wait_for(lambda m: m.seq > mark, WAIT_S) is not None  # and the PUB
        assert publisher.rejected == 0
    assert volume is not None and volume.from_snapshot
    assert volume.hu.tobytes() == hu.tobytes()


@pytest.mark.parametrize("who", ["no key", "key not on the list", "wrong server key"])
def test_a_subscriber_without_an_allowed_key_receives_nothing_and_is_counted(
    curve_keys: Keys, who: str
) -> None:
    metrics = AgentMetrics()
    if who == "no key":
        curve = None
    elif who == "key not on the list":
        curve = curve_keys.client(curve_keys.stranger_secret)
    else:
        # A robot configured with some other agent's public key: the handshake cannot complete.
        other_public, _ = create_key_pair(curve_keys.allowed.parent / "other", "server")
        curve = curve_client(other_public, curve_keys.robot_secret)
    with curve_publisher(curve_keys, metrics) as publisher:
        with SctClient(
            publisher.endpoint,
            snapshot_endpoint=publisher.snapshot_endpoint,
            curve=curve,
            snapshot_timeout_s=0.5,
        ) as intruder:
            received = intruder.receive(REFUSED_WATCH_S)
            assert intruder.snapshots == 0
            if who != "wrong server key":  # the server never sees a valid hello from a wrong-key client
                assert wait_until(lambda: rejected_total(metrics, "publish") >= 1)
                assert wait_until(lambda: rejected_total(metrics, "snapshot") >= 1)
        assert publisher.alive
    assert received is None
    if who != "wrong server key":
        assert publisher.rejected >= 2


def test_the_allow_list_lets_one_robot_in_while_refusing_another_at_the_same_time(curve_keys: Keys) -> None:
    metrics = AgentMetrics()
    with (
        curve_publisher(curve_keys, metrics) as publisher,
        SctClient(
            publisher.endpoint,
            snapshot_endpoint=publisher.snapshot_endpoint,
            curve=curve_keys.client(curve_keys.robot_secret),
        ) as robot,
        SctClient(
            publisher.endpoint,
            snapshot_endpoint=publisher.snapshot_endpoint,
            curve=curve_keys.client(curve_keys.stranger_secret),
            snapshot_timeout_s=0.5,
        ) as stranger,
    ):
        assert robot.receive(WAIT_S) is not None
        assert stranger.receive(REFUSED_WATCH_S) is None
        assert wait_until(lambda: rejected_total(metrics, "publish") >= 1)
        # Only the robot counts as a subscriber once the stranger's connection is dropped.
        assert wait_until(lambda: publisher.subscribers == 1)


# ------------------------------------------------------------------------------------------ key files


def test_a_world_readable_secret_key_is_refused_with_the_fix(curve_keys: Keys) -> None:
    curve_keys.server_secret.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"readable or writable by every user.*chmod 600"):
        load_secret_key(curve_keys.server_secret)
    config = PublishConfig(
        endpoint="tcp://0.0.0.0:5556",
        secret_key_file=curve_keys.server_secret,
        allowed_keys_folder=curve_keys.allowed,
    )
    with pytest.raises(ConfigError, match=r"publish.secret_key_file.*chmod 600"):
        publish_security(config)


def test_the_agent_refuses_to_start_with_a_world_readable_secret(curve_keys: Keys, tmp_path: Path) -> None:
    curve_keys.server_secret.chmod(0o604)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[publish]\nendpoint = "tcp://0.0.0.0:0"\nsecret_key_file = "{curve_keys.server_secret}"\n'
        f'allowed_keys_folder = "{curve_keys.allowed}"\n[metrics]\nlisten = ""\n'
        f'[watch]\nfolder = "{tmp_path / "export"}"\n[state]\nfolder = "{tmp_path / "var"}"\n'
    )
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli_main(["run", "--config", str(config)])
    assert status == 78
    assert "chmod 600" in err.getvalue()


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5556", True),
        ("tcp://127.3.4.5:5556", True),
        ("tcp://localhost:5556", True),
        ("tcp://[::1]:5556", True),
        ("ipc:///run/sct-agent/pub", True),
        ("inproc://sct", True),
        ("tcp://*:5556", False),
        ("tcp://0.0.0.0:5556", False),
        ("tcp://10.1.2.3:5556", False),
        ("tcp://eth0:5556", False),
        ("tcp://edge-box.hospital.local:5556", False),
    ],
)
def test_loopback_is_told_from_the_network(endpoint: str, local: bool) -> None:
    assert is_local_endpoint(endpoint) is local


def test_curve_is_on_by_default_off_loopback_and_needs_keys(curve_keys: Keys) -> None:
    assert publish_security(PublishConfig()) is None  # loopback: plain
    with pytest.raises(ConfigError, match=r"publish.secret_key_file.*reachable from other machines"):
        publish_security(PublishConfig(endpoint="tcp://0.0.0.0:5556"))
    with pytest.raises(ConfigError, match=r"publish.allowed_keys_folder"):
        publish_security(
            PublishConfig(endpoint="tcp://0.0.0.0:5556", secret_key_file=curve_keys.server_secret)
        )
    empty = curve_keys.allowed.parent / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no .key files"):
        publish_security(
            PublishConfig(
                endpoint="tcp://0.0.0.0:5556",
                secret_key_file=curve_keys.server_secret,
                allowed_keys_folder=empty,
            )
        )
    server = publish_security(
        PublishConfig(
            endpoint="tcp://0.0.0.0:5556",
            secret_key_file=curve_keys.server_secret,
            allowed_keys_folder=curve_keys.allowed,
        )
    )
    assert server is not None and len(server.allowed) == 1
    # "curve" forces it even on loopback; the snapshot endpoint alone being exposed also turns it on.
    forced = PublishConfig(security="curve")
    with pytest.raises(ConfigError, match=r"publish\.security = curve"):
        publish_security(forced)
    with pytest.raises(ConfigError, match=r"tcp://10\.0\.0\.5:6000"):
        publish_security(PublishConfig(snapshot_endpoint="tcp://10.0.0.5:6000"))


def test_plain_off_loopback_only_by_explicit_choice_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.publish.security"):
        assert publish_security(PublishConfig(endpoint="tcp://0.0.0.0:5556", security="plain")) is None
    assert "UNENCRYPTED" in caplog.text and "tcp://0.0.0.0:5556" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent.publish.security"):
        publish_security(PublishConfig(security="plain"))  # loopback: nothing to warn about
    assert caplog.text == ""


def test_keys_command_writes_private_pairs_never_overwrites_and_says_how_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["keys", "server", "--out", str(tmp_path / "srv")]) == keys.EXIT_OK
    said = capsys.readouterr().out
    secret = tmp_path / "srv" / "server.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert f'secret_key_file = "{secret}"' in said and "allowed_keys_folder" in said
    assert (
        cli_main(["keys", "client", "robot-or1", "--out", str(tmp_path / "r"), "--allowed", "/x/allowed"])
        == 0
    )
    said = capsys.readouterr().out
    assert "install -m 644 robot-or1.key /x/allowed/" in said and "--client-key robot-or1.key_secret" in said
    before = secret.read_bytes()
    assert cli_main(["keys", "server", "--out", str(tmp_path / "srv")]) == keys.EXIT_FAILED
    assert "never overwritten" in capsys.readouterr().err
    assert secret.read_bytes() == before
    # The pair works: the secret file loads, and its public half matches the public file.
    pair = load_secret_key(secret)
    assert curve_client(tmp_path / "srv" / "server.key", secret).server_public == pair.public
    assert (tmp_path / "srv" / "server.key").stat().st_mode & stat.S_IROTH  # the public half may be shared


def test_a_plain_client_cannot_even_ask_a_curve_snapshot_socket(curve_keys: Keys) -> None:
    """A bare DEALER without keys gets no reply at all from the snapshot socket."""
    with curve_publisher(curve_keys) as publisher:
        assert publisher.snapshot_endpoint is not None
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(publisher.snapshot_endpoint)
        # The handshake never completes, so the message may not even be queued: that is the point.
        with contextlib.suppress(zmq.Again):
            dealer.send_multipart([b"snapshot.request", b"{}", b""], flags=zmq.NOBLOCK)
        try:
            assert dealer.poll(int(REFUSED_WATCH_S * 1000)) == 0
        finally:
            dealer.close()


def test_the_running_agent_admits_allowed_robots_only_and_counts_the_rest_in_its_metrics(
    curve_keys: Keys, tmp_path: Path
) -> None:
    """The whole agent with ``publish.security = "curve"``: the wiring from config to sockets to metrics."""
    root = tmp_path / "agent"
    config = agent_config(root, write_test_protocol(root / "protocols"), write_test_model(root / "model"))
    config = replace(
        config,
        publish=replace(
            config.publish,
            security="curve",
            secret_key_file=curve_keys.server_secret,
            allowed_keys_folder=curve_keys.allowed,
        ),
    )
    with AgentService(config) as pipeline:
        endpoints = pipeline.endpoints
        url = endpoints.metrics_url
        assert endpoints.curve and url is not None
        with (
            SctClient(
                endpoints.publish,
                snapshot_endpoint=endpoints.snapshot,
                curve=curve_keys.client(curve_keys.robot_secret),
            ) as robot,
            SctClient(
                endpoints.publish,
                snapshot_endpoint=endpoints.snapshot,
                curve=curve_keys.client(curve_keys.stranger_secret),
                snapshot_timeout_s=0.5,
            ) as stranger,
        ):
            assert robot.receive(WAIT_S) is not None and robot.snapshots == 1
            assert stranger.receive(REFUSED_WATCH_S) is None

            def scraped() -> str:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return str(response.read().decode())

            assert wait_until(lambda: "sct_agent_publish_curve 1.0" in scraped())
            assert wait_until(
                lambda: any(
                    line.startswith('sct_agent_subscribers_rejected_total{reason="auth",socket="publish"}')
                    and float(line.rsplit(" ", 1)[1]) >= 1
                    for line in scraped().splitlines()
                )
            )
