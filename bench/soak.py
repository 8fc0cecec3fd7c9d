"""Soak benchmark: many series through one running agent, subscribers joining and leaving; is anything growing?

Usage: .venv/bin/python bench/soak.py [--series 50] [--backend torch-eager] [--json FILE]

The agent runs as its own process (``sct-agent run``, as systemd starts it) with DICOM output on. This script
plays the scanner, exporting one small lumbar series (162 x 162 x 40, two echoes: the test suite's field of view)
after another, each a new acquisition with new UIDs, and waits for its volume; every fifth series a new robot
subscribes and the oldest one leaves (three connected besides the one that waits for volumes), so connection set-up
and tear-down are exercised too. After every series it samples the agent process, and compares the medians
of series 6 to 10 with those of the last five:

- resident memory (VmRSS) and its peak (VmHWM),
- open file descriptors (``/proc/<pid>/fd``),
- threads,
- the journal's size on disk (the SQLite file and its WAL) and its size per series.

Target (docs/architecture.md): flat. RSS, descriptors and threads grow by at most 5 % from series 10 to the last;
the journal grows by its rows only (bytes per series roughly constant; retention bounds it by age, which a soak
of minutes does not reach). Series 10, not 1, is the baseline: the first series warm caches and allocator pools.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.client import SctClient
from agent.ops.agent_process import AgentProcess, free_port
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, SimulationRequest, export_case

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agent_support import SMALL_FOV_MM, SMALL_SLAB_DEPTH, write_test_model, write_test_protocol

SEED = 920001
BASELINE_SERIES = 10
#: Series whose samples give each figure's median (the baseline's and the last's five).
WINDOW = 5
SUBSCRIBER_EVERY = 5
SUBSCRIBERS = 3
START_TIMEOUT_S = 300.0
SERIES_TIMEOUT_S = 300.0
#: Growth allowed from the baseline to the last series (fraction).
FLAT = 0.05


@dataclass(frozen=True, slots=True)
class Sample:
    series: int
    rss_bytes: int
    peak_rss_bytes: int
    fds: int
    threads: int
    journal_bytes: int


def sample(pid: int, state: Path, series: int) -> Sample:
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()
    journal = sum(p.stat().st_size for p in state.glob("journal.sqlite*"))
    return Sample(
        series=series,
        rss_bytes=int(status["VmRSS"][0]) * 1024,
        peak_rss_bytes=int(status["VmHWM"][0]) * 1024,
        fds=sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()),
        threads=int(status["Threads"][0]),
        journal_bytes=journal,
    )


def _median_sample(every: list[Sample], series: int) -> Sample:
    window = [s for s in every if series - WINDOW < s.series <= series]
    return Sample(
        series=series,
        rss_bytes=int(statistics.median(s.rss_bytes for s in window)),
        peak_rss_bytes=max(s.peak_rss_bytes for s in window),
        fds=int(statistics.median(s.fds for s in window)),
        threads=int(statistics.median(s.threads for s in window)),
        journal_bytes=window[-1].journal_bytes,
    )


def write_config(root: Path, model: Path, protocols: Path, backend: str) -> tuple[Path, str, str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    snapshot = f"tcp://127.0.0.1:{free_port()}"
    path = root / "agent.toml"
    path.write_text(
        '[watch]\nfolder = "export"\n\n[state]\nfolder = "var"\n\n'
        f'[protocols]\nfolder = "{protocols}"\n\n'
        f'[engine]\nmodel = "{model}"\nbackend = "{backend}"\nslab_depth = {SMALL_SLAB_DEPTH}\n\n'
        f'[publish]\nendpoint = "{endpoint}"\nsnapshot_endpoint = "{snapshot}"\n\n'
        '[dicom]\nfolder = "dicom"\n\n[metrics]\nlisten = ""\n'
    )
    return path, endpoint, snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=50)
    parser.add_argument("--backend", default="torch-eager")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.series < BASELINE_SERIES + 1:
        parser.error(f"--series must be more than {BASELINE_SERIES}")

    request = SimulationRequest(seed=SEED, fov_mm=SMALL_FOV_MM, supersample=1)
    case = generate_case(SEED, request.acquisition(), supersample=1)
    with tempfile.TemporaryDirectory(prefix="sct-soak-") as temp:
        root = Path(temp)
        config, endpoint, snapshot = write_config(
            root, write_test_model(root / "model"), write_test_protocol(root / "protocols"), args.backend
        )
        agent = AgentProcess(config, root / "agent.log")
        every: list[Sample] = []
        clients: list[SctClient] = []
        started = time.monotonic()
        try:
            agent.wait_ready(START_TIMEOUT_S)
            watcher = SctClient(endpoint, snapshot_endpoint=snapshot)
            clients = [SctClient(endpoint, snapshot_endpoint=snapshot) for _ in range(SUBSCRIBERS)]
            for n in range(1, args.series + 1):
                if n % SUBSCRIBER_EVERY == 0:
                    # One robot leaves, another joins: as many connected at every sample, so descriptors compare.
                    clients.pop(0).close()
                    clients.append(SctClient(endpoint, snapshot_endpoint=snapshot))
                # A new export of the same case: new UIDs, so a new acquisition each time.
                export_case(case, ExportOptions(out_dir=root / "export" / f"series-{n:03d}"))
                deadline = time.monotonic() + SERIES_TIMEOUT_S
                volume = None
                while volume is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"series {n}: no volume within {SERIES_TIMEOUT_S} s")
                    volume = watcher.receive_volume(0.5)
                    for client in clients:
                        client.receive(0.0)
                        client.pop_volume()
                time.sleep(0.5)  # the DICOM stage finishes the series; the journal commits
                every.append(sample(agent.pid, root / "var", n))
                print(f"series {n:3d}: volume after {time.monotonic() - started:6.1f} s", flush=True)
            watcher.close()
        finally:
            for client in clients:
                client.close()
            status = agent.stop(120)
        if status != 0:
            print(f"the agent exited with {status}; log in {root / 'agent.log'}", file=sys.stderr)
            return 1

    # Medians of the five series ending at the baseline and at the last: resident memory moves by tens of MB
    # from one series to the next as allocator pools fill and are given back, so one sample is noise.
    samples = [_median_sample(every, BASELINE_SERIES), _median_sample(every, args.series)]
    base, last = samples
    growth = {
        key: (getattr(last, key) - getattr(base, key)) / getattr(base, key)
        for key in ("rss_bytes", "fds", "threads")
    }
    journal_per_series = (last.journal_bytes - base.journal_bytes) / (last.series - base.series)
    figures = {
        "series": args.series,
        "backend": args.backend,
        "samples": [asdict(s) for s in samples],
        "every": [asdict(s) for s in every],
        "growth": {k: round(v, 4) for k, v in growth.items()},
        "journal_bytes_per_series": round(journal_per_series),
        "journal_bytes_per_series_first_10": round(base.journal_bytes / base.series),
        "flat": all(v <= FLAT for v in growth.values()),
        "wall_s": round(time.monotonic() - started, 1),
    }
    for s in samples:
        print(
            f"after series {s.series:3d}: RSS {s.rss_bytes / 2**20:7.1f} MiB (peak {s.peak_rss_bytes / 2**20:7.1f}), "
            f"{s.fds} fds, {s.threads} threads, journal {s.journal_bytes / 2**10:7.1f} KiB"
        )
    print(
        "growth from series {} to {}: RSS {:+.1%}, fds {:+.1%}, threads {:+.1%}; journal {:.0f} bytes per series "
        "(first {}: {:.0f}); {}".format(
            base.series,
            last.series,
            growth["rss_bytes"],
            growth["fds"],
            growth["threads"],
            journal_per_series,
            base.series,
            base.journal_bytes / base.series,
            "flat" if figures["flat"] else f"NOT flat (> {FLAT:.0%})",
        )
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0 if figures["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
