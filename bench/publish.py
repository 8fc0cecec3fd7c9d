"""Benchmark: the agent's publish throughput over loopback TCP, with CURVE off and on, against bare pyzmq.

Usage: .venv/bin/python bench/publish.py [--runs 5] [--count 100] [--quick] [--json FILE]

The target (docs/architecture.md, Target figures) is slab bytes per second over loopback >= 0.8 x bare pyzmq
PUB/SUB with the same frames. Every run sends ``--count`` slabs of ``--slices`` x 338 x 338 int16 HU (the
model's slab depth, 56 slices = 12.8 MB, on the lumbar grid) in each of these cases, over tcp://127.0.0.1, to
a subscriber in another process (spawned once, so the two sides never share a GIL; as in the pyzmq baseline
of bench/README.md):

- ``bare``          a bare pyzmq PUB (SNDHWM 0) sends the agent's three frames (topic, JSON header, payload) for
                    one slab, encoded once, ``send_multipart(copy=False)``, to a raw SUB (RCVHWM 0);
- ``bare-curve``    the same with the PUB a CURVE server (no ZAP handler: ZAP runs once per connection, at the
                    handshake, never per message) and the SUB a CURVE client;
- ``agent``         the agent's ``Publisher`` (plain) fed through ``submit`` to the same raw SUB: the publisher's
                    own cost (queue hand-off, encoding each header, snapshot store, non-blocking send);
- ``agent-curve``   the ``Publisher`` with CURVE and its ZAP allow-list, to a raw CURVE SUB;
- ``client``        the plain ``Publisher`` to an ``SctClient`` (decode with sha256 verify, sequence tracking):
                    end to end as a robot sees it;
- ``client-curve``  the CURVE ``Publisher`` to a CURVE ``SctClient``.

The raw SUB wraps each payload with ``np.frombuffer(frame.buffer)`` and touches nothing else (as there).
Throughput is ``count`` payloads' bytes over the time from the first send (or submit) in this process to the last
slab received in the subscriber (both on CLOCK_MONOTONIC); the JSON also keeps the subscriber-only window (first
to last received, ``count - 1`` payloads). Publishers get a send HWM above ``count``, and every case checks that
all ``count`` slabs arrived: a drop is reported and makes the exit status 1. Cases are interleaved within each run
and their order rotates from run to run, so the shared machine's noise falls on all alike. Ratios are taken within
each run, then the median (and range) over runs is reported.

One module on purpose: the benchmark spawns itself as the subscriber process, so both sides of every case and
the comparison they feed are in the one script that is run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import zmq

from agent.client import SctClient
from agent.publish.curve_keys import (
    CurveClient,
    CurveServer,
    apply_client,
    create_key_pair,
    curve_client,
    curve_server,
)
from agent.publish.publisher import Publisher
from agent.publish.wire import (
    TOPIC_HEARTBEAT,
    TOPIC_SLAB,
    HeartbeatMessage,
    SlabMessage,
    encode,
)
from agent.records import SctSlab, payload_sha256
from sct_core.geometry import VolumeGeometry

#: The lumbar grid (docs/agent.md) and the model's slab depth (engines/model/default/manifest.json).
VOLUME_SHAPE: Final = (100, 338, 338)
SLAB_SLICES: Final = 56
#: Probe topic the bare publisher sends until the subscriber has joined (PUB drops everything before that).
PROBE_TOPIC: Final = b"bench.probe"
#: The agent's heartbeat interval here: the subscriber is ready once it has received one.
HEARTBEAT_S: Final = 0.25
#: Seconds the subscriber waits for the first probe, or for the next slab, before it gives up.
READY_TIMEOUT_S: Final = 15.0
TARGET_RATIO: Final = 0.8

CASES: Final = ("bare", "bare-curve", "agent", "agent-curve", "client", "client-curve")
#: (label in the table, numerator, denominator)
RATIOS: Final = (
    ("agent / bare (publisher cost, target >= 0.8)", "agent", "bare"),
    ("agent-curve / bare", "agent-curve", "bare"),
    ("agent-curve / bare-curve", "agent-curve", "bare-curve"),
    ("client / bare (end to end, sha256 verify)", "client", "bare"),
    ("client-curve / bare-curve", "client-curve", "bare-curve"),
)


@dataclass(frozen=True, slots=True)
class Job:
    """What the subscriber process is asked to receive."""

    mode: str  # "raw" or "client"
    endpoint: str
    count: int
    probe_topic: bytes
    curve: CurveClient | None
    timeout_s: float
    #: The publisher's snapshot endpoint, for the client mode (it synchronises first, as a robot does).
    snapshot: str | None = None


@dataclass(frozen=True, slots=True)
class Received:
    """What the subscriber saw: slabs and payload bytes, first and last arrival (CLOCK_MONOTONIC)."""

    slabs: int
    nbytes: int
    first_at: float
    last_at: float
    gaps: int = 0
    rejected: int = 0
    error: str | None = None


# ------------------------------------------------------------------------------------------ subscriber side


def _subscriber(conn: Connection) -> None:
    """Serve jobs until told to stop (None): connect, report ready at the first probe, count the slabs."""
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            result = _receive_raw(job, conn) if job.mode == "raw" else _receive_client(job, conn)
        except Exception as error:
            result = Received(0, 0, 0.0, 0.0, error=f"{type(error).__name__}: {error}")
        conn.send(result)


def _receive_raw(job: Job, conn: Connection) -> Received:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socket = context.socket(zmq.SUB)
    try:
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        if job.curve is not None:
            apply_client(socket, job.curve)
        socket.setsockopt(zmq.SUBSCRIBE, TOPIC_SLAB)
        socket.setsockopt(zmq.SUBSCRIBE, job.probe_topic)
        socket.connect(job.endpoint)
        deadline = time.monotonic() + job.timeout_s
        while True:
            if not socket.poll(max(1, round((deadline - time.monotonic()) * 1000))):
                return Received(0, 0, 0.0, 0.0, error="no probe from the publisher")
            if socket.recv_multipart(copy=False)[0].bytes == job.probe_topic:
                break
        conn.send("ready")
        slabs = nbytes = 0
        first = last = 0.0
        while slabs < job.count:
            if not socket.poll(round(job.timeout_s * 1000)):
                break
            frames = socket.recv_multipart(copy=False)
            last = time.monotonic()
            if frames[0].bytes != TOPIC_SLAB:
                continue
            if slabs == 0:
                first = last
            payload = np.frombuffer(frames[2].buffer, dtype="<i2")
            slabs += 1
            nbytes += payload.nbytes
        return Received(slabs, nbytes, first, last)
    finally:
        socket.close(0)
        context.term()


def _receive_client(job: Job, conn: Connection) -> Received:
    with SctClient(job.endpoint, snapshot_endpoint=job.snapshot, curve=job.curve, rcvhwm=0) as client:
        deadline = time.monotonic() + job.timeout_s
        while not isinstance(client.receive(max(0.0, deadline - time.monotonic())), HeartbeatMessage):
            if time.monotonic() >= deadline:
                return Received(0, 0, 0.0, 0.0, error="no heartbeat from the publisher")
        conn.send("ready")
        slabs = nbytes = 0
        first = last = 0.0
        while slabs < job.count:
            message = client.receive(job.timeout_s)
            if message is None:
                break
            if not isinstance(message, SlabMessage):
                continue
            last = time.monotonic()
            if slabs == 0:
                first = last
            slabs += 1
            nbytes += message.hu.nbytes
        return Received(slabs, nbytes, first, last, gaps=client.gap_count, rejected=client.rejected)


# ---------------------------------------------------------------------------------------------- sender side


@dataclass(frozen=True, slots=True)
class Keys:
    server: CurveServer
    client: CurveClient


def make_keys(folder: Path) -> Keys:
    create_key_pair(folder / "server", "publisher")
    create_key_pair(folder / "clients", "bench")
    allowed = folder / "allowed"
    allowed.mkdir()
    shutil.copy(folder / "clients" / "bench.key", allowed / "bench.key")
    return Keys(
        server=curve_server(folder / "server" / "publisher.key_secret", allowed),
        client=curve_client(folder / "server" / "publisher.key", folder / "clients" / "bench.key_secret"),
    )


def make_slab(slices: int, seed: int = 0) -> SctSlab:
    geometry = VolumeGeometry(
        shape=(max(slices, VOLUME_SHAPE[0]), VOLUME_SHAPE[1], VOLUME_SHAPE[2]),
        spacing=(0.9, 0.74, 0.74),
        origin=(36.7, -125.1, 124.8),
        row_direction=(0.0, 1.0, 0.0),
        column_direction=(0.0, 0.0, -1.0),
        slice_direction=(-1.0, 0.0, 0.0),
    )
    hu: npt.NDArray[np.int16] = (
        np.random.default_rng(seed)
        .integers(-1024, 3072, size=(slices, *VOLUME_SHAPE[1:]), dtype=np.int16)
        .astype("<i2", copy=False)
    )
    return SctSlab(
        acquisition_id="bench-publish", protocol_id="bonemri_lumbar_1p5t", model_id="sct-lumbar-dual-echo-unet",
        model_version="1.0.0", geometry=geometry, slab_index=0, slab_count=2, start=0, size=slices, hu=hu,
        sha256=payload_sha256(hu), inference_s=0.0, inputs_complete_at=0.0, produced_at=0.0,
    )  # fmt: skip


def _wait_ready(conn: Connection, timeout_s: float, probe: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.01):
        if probe is not None:
            probe()
        if time.monotonic() > deadline:
            raise TimeoutError(f"subscriber not ready within {timeout_s} s")
    reply = conn.recv()
    if reply != "ready":
        raise RuntimeError(f"subscriber could not start: {reply}")


def _result(conn: Connection, timeout_s: float) -> Received:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"subscriber gave no result within {timeout_s} s")
    received: Received = conn.recv()
    return received


def run_bare(
    conn: Connection, slab: SctSlab, count: int, curve: Keys | None, timeout_s: float
) -> dict[str, Any]:
    frames = encode(slab, 1, "bench", time.time())
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = context.socket(zmq.PUB)
    try:
        pub.setsockopt(zmq.SNDHWM, 0)
        pub.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            pub.setsockopt(zmq.CURVE_SERVER, 1)
            pub.setsockopt(zmq.CURVE_PUBLICKEY, curve.server.keys.public)
            pub.setsockopt(zmq.CURVE_SECRETKEY, curve.server.keys.secret)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        conn.send(
            Job(
                "raw",
                f"tcp://127.0.0.1:{port}",
                count,
                PROBE_TOPIC,
                None if curve is None else curve.client,
                timeout_s,
            )
        )
        _wait_ready(conn, timeout_s + 5, lambda: pub.send_multipart([PROBE_TOPIC, b"", b""]))
        started = time.monotonic()
        for _ in range(count):
            pub.send_multipart(frames, copy=False)
        sent = time.monotonic()
        received = _result(conn, count * 10.0 + timeout_s + 30)
    finally:
        pub.close(0)
        context.term()
    return _figures(received, slab, count, started, sent)


def run_agent(
    conn: Connection,
    slab: SctSlab,
    count: int,
    curve: Keys | None,
    timeout_s: float,
    mode: str,
    queue_depth: int,
) -> dict[str, Any]:
    publisher = Publisher(
        "tcp://127.0.0.1:0",
        snapshot_endpoint="tcp://127.0.0.1:0",  # as in production: the snapshot store is kept while publishing
        curve=None if curve is None else curve.server,
        heartbeat_s=HEARTBEAT_S,
        send_hwm=count + 16,
        queue_depth=queue_depth,
    )
    publisher.start()
    try:
        conn.send(
            Job(
                mode,
                publisher.endpoint,
                count,
                TOPIC_HEARTBEAT,
                None if curve is None else curve.client,
                timeout_s,
                publisher.snapshot_endpoint,
            )
        )
        _wait_ready(conn, timeout_s + 5)
        started = time.monotonic()
        for _ in range(count):
            publisher.submit(slab, timeout=60.0)
        sent = time.monotonic()
        received = _result(conn, count * 10.0 + timeout_s + 30)
    finally:
        publisher.stop(30)
    figures = _figures(received, slab, count, started, sent)
    figures.update(publisher_dropped=publisher.dropped, publisher_errors=publisher.errors)
    return figures


def _figures(received: Received, slab: SctSlab, count: int, started: float, sent: float) -> dict[str, Any]:
    payload = slab.hu.nbytes
    figures: dict[str, Any] = {**asdict(received), "sender_loop_s": sent - started}
    figures["lost"] = count - received.slabs
    if received.slabs == count and received.nbytes == count * payload and received.last_at > started:
        figures["gb_per_s"] = count * payload / (received.last_at - started) / 1e9
        window = received.last_at - received.first_at
        figures["receiver_window_gb_per_s"] = (count - 1) * payload / window / 1e9 if window > 0 else None
    else:
        figures["gb_per_s"] = None
        figures["receiver_window_gb_per_s"] = None
    return figures


def _problems(case: str, figures: dict[str, Any]) -> list[str]:
    found = []
    if figures.get("error"):
        found.append(f"{case}: {figures['error']}")
    if figures["lost"]:
        found.append(f"{case}: {figures['lost']} slab(s) lost")
    for key in ("gaps", "rejected", "publisher_dropped", "publisher_errors"):
        if figures.get(key):
            found.append(f"{case}: {key} {figures[key]}")
    return found


# ------------------------------------------------------------------------------------------------- report


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(per_run: list[dict[str, dict[str, Any]]], cases: list[str]) -> dict[str, Any]:
    medians = {case: _median([run[case]["gb_per_s"] for run in per_run]) for case in cases}
    windows = {case: _median([run[case]["receiver_window_gb_per_s"] for run in per_run]) for case in cases}
    ratios: dict[str, dict[str, float | None]] = {}
    for label, top, bottom in RATIOS:
        if top not in cases or bottom not in cases:
            continue
        values = [
            run[top]["gb_per_s"] / run[bottom]["gb_per_s"]
            for run in per_run
            if run[top]["gb_per_s"] and run[bottom]["gb_per_s"]
        ]
        ratios[label] = {
            "median": statistics.median(values) if values else None,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
        }
    return {"gb_per_s": medians, "receiver_window_gb_per_s": windows, "ratios": ratios}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(summary: dict[str, Any], cases: list[str], payload: int, count: int) -> None:
    print()
    print(
        f"| case ({count} x {payload / 1e6:.2f} MB slabs) | GB/s send -> last received | slabs/s | GB/s receiver window |"
    )
    print("|---|---|---|---|")
    for case in cases:
        gbps = summary["gb_per_s"][case]
        rate = None if gbps is None else gbps * 1e9 / payload
        window = summary["receiver_window_gb_per_s"][case]
        print(f"| {case} | {_fmt(gbps, '.2f')} | {_fmt(rate, '.0f')} | {_fmt(window, '.2f')} |")
    print()
    print("| ratio (per run, median [min - max]) | value |")
    print("|---|---|")
    for label, r in summary["ratios"].items():
        print(f"| {label} | {_fmt(r['median'], '.2f')} [{_fmt(r['min'], '.2f')} - {_fmt(r['max'], '.2f')}] |")
    plain, curve = summary["gb_per_s"].get("bare"), summary["gb_per_s"].get("bare-curve")
    if plain and curve:
        print()
        print(f"CURVE costs {1 / curve - 1 / plain:.3f} s per GB over plain (bare pyzmq, medians)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=100, help="slabs per case and run")
    parser.add_argument("--slices", type=int, default=SLAB_SLICES, help="slices per slab (338 x 338 each)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 20 slabs, 2 runs")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}"
    )
    parser.add_argument(
        "--queue-depth", type=int, default=64, help="the Publisher's submit queue (agent default 64)"
    )
    parser.add_argument("--timeout", type=float, default=READY_TIMEOUT_S, help="subscriber idle timeout, s")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.runs, args.count = 2, 20
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or args.runs < 1 or args.count < 2:
        parser.error(f"unknown cases {unknown}" if unknown else "--runs >= 1 and --count >= 2 are needed")

    slab = make_slab(args.slices)
    payload = slab.hu.nbytes
    print(
        f"{len(cases)} cases x {args.runs} runs, {args.count} slabs of {slab.hu.shape} int16 "
        f"({payload / 1e6:.2f} MB) each, tcp://127.0.0.1",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="sct-bench-publish-"))
    parent, child = mp.Pipe()
    process = mp.get_context("spawn").Process(target=_subscriber, args=(child,), name="bench-subscriber")
    process.start()
    per_run: list[dict[str, dict[str, Any]]] = []
    problems: list[str] = []
    try:
        keys = make_keys(work)
        for run in range(args.runs):
            order = cases[run % len(cases) :] + cases[: run % len(cases)]
            figures: dict[str, dict[str, Any]] = {}
            for case in order:
                curve = keys if case.endswith("-curve") else None
                if case.startswith("bare"):
                    figures[case] = run_bare(parent, slab, args.count, curve, args.timeout)
                else:
                    mode = "client" if case.startswith("client") else "raw"
                    figures[case] = run_agent(
                        parent, slab, args.count, curve, args.timeout, mode, args.queue_depth
                    )
                problems += [f"run {run + 1} {p}" for p in _problems(case, figures[case])]
            per_run.append(figures)
            print(
                f"  run {run + 1}: "
                + ", ".join(f"{c} {_fmt(figures[c]['gb_per_s'], '.2f')}" for c in cases)
                + " GB/s",
                flush=True,
            )
    finally:
        parent.send(None)
        process.join(30)
        if process.is_alive():
            process.terminate()
        shutil.rmtree(work, ignore_errors=True)

    summary = summarise(per_run, cases)
    print_table(summary, cases, payload, args.count)
    headline = summary["ratios"].get(RATIOS[0][0], {}).get("median")
    if headline is not None:
        verdict = "meets" if headline >= TARGET_RATIO else "is below"
        print(
            f"agent / bare = {headline:.2f}: {verdict} the target (>= {TARGET_RATIO}; docs/architecture.md)"
        )
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"summary": summary, "runs": per_run, "payload_bytes": payload, "args": vars(args)},
                indent=2,
                default=str,
            )
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
