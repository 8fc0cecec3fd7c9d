"""How soon a robot that connects late has the volumes it missed: the Clone pattern's snapshot, timed.

The publisher holds ``--volumes`` finished lumbar volumes (100 x 338 x 338 int16, 22.8 MB each), as the agent's
snapshot store does after a morning's series. A new ``SctClient`` connects (a robot starting or restarting) and
the time from constructing it to having every volume, checksums verified, is measured ``--runs`` times, with
CURVE off and on, interleaved. The subscriber runs in this process and the publisher in its own thread, which is
how a robot's process and the agent's publisher thread meet over loopback; medians are printed.

    .venv/bin/python bench/late_join.py [--runs 5] [--volumes 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from publish import Keys, make_keys  # a sibling bench script, not a package

from agent.client import SctClient
from agent.publish.publisher import Publisher
from agent.records import SctVolume, payload_sha256
from sct_core.geometry import VolumeGeometry

VOLUME_SHAPE = (100, 338, 338)
TIMEOUT_S = 120.0


def volume(seed: int) -> SctVolume:
    geometry = VolumeGeometry(
        shape=VOLUME_SHAPE,
        spacing=(0.9, 0.74, 0.74),
        origin=(-45.0, -125.0, 125.0),
        row_direction=(0.0, 1.0, 0.0),
        column_direction=(0.0, 0.0, -1.0),
        slice_direction=(1.0, 0.0, 0.0),
    )
    hu = np.random.default_rng(seed).integers(-1024, 3000, size=VOLUME_SHAPE).astype(np.int16)
    return SctVolume(
        acquisition_id=f"bench-{seed}",
        protocol_id="bonemri_lumbar_1p5t",
        model_id="bench",
        model_version="0",
        geometry=geometry,
        hu=hu,
        sha256=payload_sha256(hu),
        slab_count=2,
        produced_at=time.time(),
    )


def join_once(publisher: Publisher, keys: Keys | None, count: int) -> float:
    started = time.perf_counter()
    with SctClient(
        publisher.endpoint,
        snapshot_endpoint=publisher.snapshot_endpoint,
        curve=None if keys is None else keys.client,
        snapshot_timeout_s=TIMEOUT_S,
    ) as client:
        got = 0
        deadline = time.monotonic() + TIMEOUT_S
        while got < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {got} of {count} volumes within {TIMEOUT_S} s")
            client.receive(0.5)
            while (received := client.pop_volume()) is not None:
                assert received.from_snapshot and payload_sha256(received.hu) == received.sha256
                got += 1
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--volumes", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sct-bench-late-join-"))
    times: dict[str, list[float]] = {"plain": [], "curve": []}
    try:
        keys = make_keys(work)
        volumes = [volume(seed) for seed in range(args.volumes)]
        publishers = {
            "plain": Publisher(
                "tcp://127.0.0.1:0", snapshot_endpoint="tcp://127.0.0.1:0", snapshot_volumes=args.volumes
            ),
            "curve": Publisher(
                "tcp://127.0.0.1:0",
                snapshot_endpoint="tcp://127.0.0.1:0",
                snapshot_volumes=args.volumes,
                curve=keys.server,
            ),
        }
        for publisher in publishers.values():
            publisher.start()
            for item in volumes:
                publisher.submit(item)
        for publisher in publishers.values():
            while publisher.store.volume_count < args.volumes:
                time.sleep(0.01)
        for _ in range(args.runs):
            for mode, publisher in publishers.items():
                times[mode].append(join_once(publisher, keys if mode == "curve" else None, args.volumes))
        for publisher in publishers.values():
            publisher.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    megabytes = args.volumes * int(np.prod(VOLUME_SHAPE)) * 2 / 1e6
    results = {
        "volumes": args.volumes,
        "snapshot_mb": round(megabytes, 1),
        "runs": args.runs,
        **{f"{mode}_median_s": statistics.median(values) for mode, values in times.items()},
        **{f"{mode}_all_s": values for mode, values in times.items()},
    }
    print(
        f"late joiner: {args.volumes} finished volumes ({megabytes:.1f} MB) from the snapshot, checksums verified"
    )
    for mode, values in times.items():
        runs = ", ".join(f"{t:.2f}" for t in values)
        print(f"  {mode:5s}: median {results[f'{mode}_median_s']:.2f} s (runs: {runs})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
