"""``sct-agent demo``: the whole job on the embedded default, as a new user first sees it.

It starts the agent (``sct-agent run``, a separate process, exactly as systemd would), and a subscriber, then
plays a scanner: a dual-echo lumbar series that matches the seed protocol is exported file by file at a
realistic pace into the agent's export folder, followed by one that deviates (TE2 4.8 ms), then a third that
passes the protocol but holds titanium pedicle screws and rods the model never saw. It prints what the
technologist and the robot see: each verdict with its reasons, the first-image-to-verdict and last-file-to-
volume latencies, the error of the received synthetic CT against the phantom's true CT, and where the model's
confidence says the sCT is not to be trusted (the screws); it writes a picture (MR echo 1 | sCT | true CT,
sagittal and axial) and one of the screws series with the flagged region outlined, and stops everything it
started. While it runs, the
agent's status page (the technologist's screen) shows both series live at the address it prints; ``--stay``
keeps the agent and its page up afterwards until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from agent.cli.demo_flagged import flagged_outputs
from agent.cli.listen import save_volume
from agent.cli.montage import CT_WINDOW_HU, Panel, render_montage
from agent.client import ReceivedVolume, SctClient
from agent.ops.agent_process import AgentProcess, write_loopback_config
from agent.publish.wire import StatusMessage
from engines.backends.registry import AUTO, BACKENDS
from engines.evaluation.metrics import compute_metrics, masks_from_ct
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.phantom.pathology import Pathology
from engines.scanner.export import ExportOptions, SimulationRequest, export_case

DEFAULT_SEED = 7
DEVIATING_SEED = 8
DEVIATION = "EchoTime2=4.8"
#: The third series: another subject, scanned with the seed protocol, with pedicle screws and rods.
SCREWS_SEED = 9
SCREWS: tuple[Pathology, ...] = (Pathology.SCREWS,)
#: Files per second: a scanner's DICOM export to a node on the hospital network (the reconstructor itself
#: emits about 65 images/s, a network export somewhat fewer).
DEFAULT_RATE = 40.0
#: Bounds on how long the demo waits for the agent to start (engine warm-up) and for results.
START_TIMEOUT_S = 300.0
RESULT_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0
#: How long the demo waits for the status page to show both final verdicts and the preview (rendered on the
#: page's own thread after the volume is published).
PAGE_TIMEOUT_S = 60.0
#: Folder under ``--out`` for compiled engines, kept across runs (the first run builds, later ones load).
ENGINE_CACHE = "engine-cache"


@dataclass
class _Listener:
    """The robot's side: a subscriber in a thread, keeping every status and saving every volume."""

    endpoint: str
    snapshot: str
    out: Path
    statuses: list[tuple[float, StatusMessage]] = field(default_factory=list)
    volumes: list[tuple[float, ReceivedVolume, Path]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    gaps: int = 0

    def run(self) -> None:
        with SctClient(self.endpoint, snapshot_endpoint=self.snapshot) as client:
            self.ready.set()
            while not self.stop.is_set():
                message = client.receive(0.1)
                now = time.time()
                volume = client.pop_volume()
                saved = save_volume(volume, self.out) if volume is not None else None
                with self.lock:
                    if isinstance(message, StatusMessage):
                        self.statuses.append((now, message))
                    if volume is not None and saved is not None:
                        self.volumes.append((now, volume, saved))
                    self.gaps = client.gap_count

    def dicom_reported(self, count: int = 1) -> bool:
        with self.lock:
            written = sum(1 for _, s in self.statuses if s.kind == "dicom" and s.body.get("step") == "write")
        return written >= count

    def flagged(self, acquisition_id: str) -> StatusMessage | None:
        """The ``flagged`` status of an acquisition: what its sCT's confidence check found."""
        with self.lock:
            return next(
                (s for _, s in self.statuses if s.kind == "flagged" and s.acquisition_id == acquisition_id),
                None,
            )

    def dicom_folder(self, acquisition_id: str) -> str | None:
        with self.lock:
            for _, status in self.statuses:
                if (
                    status.kind == "dicom"
                    and status.acquisition_id == acquisition_id
                    and status.body.get("ok")
                ):
                    return str(status.body.get("series_folder"))
        return None

    def dicom_series(self) -> str | None:
        """The series folder of the first DICOM series the agent reported written, None if it failed."""
        with self.lock:
            for _, status in self.statuses:
                if status.kind == "dicom" and status.body.get("ok"):
                    return str(status.body["series_folder"])
        return None

    def finals_at_least(self, count: int) -> bool:
        return sum(1 for _, s in self.verdicts() if s.body["final"]) >= count

    def volumes_at_least(self, count: int) -> bool:
        with self.lock:
            return len(self.volumes) >= count

    def verdicts(self) -> list[tuple[float, StatusMessage]]:
        with self.lock:
            return [(t, s) for t, s in self.statuses if s.kind == "verdict"]


@dataclass(frozen=True, slots=True)
class SeriesOutcome:
    label: str
    acquisition_id: str
    outcome: str
    protocol_id: str
    reasons: tuple[str, ...]
    first_verdict_outcome: str
    first_image_to_verdict_s: float
    #: Seconds from the first file on disk to the first rejecting verdict received (None if never rejected).
    first_file_to_reject_s: float | None
    files: int
    export_s: float
    last_file_to_volume_s: float | None
    #: What the sCT's confidence check said (the ``flagged`` status's message), "" without a volume.
    flagged: str = ""
    #: Regions flagged (None: not checked, or no volume).
    flagged_regions: int | None = None


@dataclass(frozen=True, slots=True)
class DemoResult:
    series: tuple[SeriesOutcome, ...]
    picture: Path
    received: Path
    model: str
    mae_hu: float
    bone_dice_200: float
    gaps: int
    #: The sCT DICOM CT series the agent wrote for the passing series (None if it reported a failure).
    dicom_series: Path | None
    agent_exit_status: int
    metrics: dict[str, float]
    #: The agent's status page while it ran.
    page_url: str = ""
    #: What the page showed for each series at the end, one line each (read as a browser reads it).
    page_cards: tuple[str, ...] = ()
    #: The page's own preview of the passing series (the PNG the page serves), saved beside the picture.
    page_preview: Path | None = None
    #: The screws series: the picture with its flagged region outlined, the page's preview of it, and the DICOM
    #: Segmentation the agent wrote beside its sCT series (None when it wrote none).
    flagged_picture: Path | None = None
    flagged_preview: Path | None = None
    segmentation: Path | None = None


def _page(page_url: str, count: int, out: Path) -> tuple[tuple[str, ...], dict[str, Path]]:
    """The status page's cards as a browser reads them (``state.json``), once ``count`` series have their final
    verdict and the published ones their previews and confidence, one line each; and those previews, saved to
    ``out`` (by acquisition id): ``page-preview.png`` for the first, ``page-preview-flagged.png`` for one
    whose sCT was flagged."""
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while True:
        with urllib.request.urlopen(page_url + "state.json", timeout=10) as response:
            cards = json.load(response)["acquisitions"]
        finals = [c for c in cards if c["verdict"] is not None and c["verdict"]["final"]]
        published = [c for c in cards if c["state"] == "published"]
        done = all(c["preview"] and c["flagged"] is not None for c in published)
        if (len(finals) >= count and done) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    lines: list[str] = []
    previews: dict[str, Path] = {}
    for card in reversed(cards):  # the page lists the newest first
        verdict = card["verdict"]
        outcome = verdict["outcome"].upper() if verdict is not None else "no verdict"
        actions = "; ".join(r["action"] for r in verdict["reasons"]) if verdict is not None else ""
        flagged = card["flagged"]
        confidence = ""
        if flagged is not None and flagged["verdict"] == "flagged":
            confidence = f"; sCT NOT TRUSTED IN PART: {'; '.join(flagged['lines'])}"
        elif flagged is not None:
            confidence = f"; {flagged['message']}"
        lines.append(
            f"series {card['series_number']} '{card['series_description']}': {outcome}, {card['state']}, "
            f"{card['images_received']}/{card['images_expected']} images, "
            f"{card['slabs_done']}/{card['slab_count']} sCT slabs"
            + (f"; {actions}" if actions else "")
            + confidence
        )
        if card["preview"]:
            flagged_card = flagged is not None and flagged["verdict"] == "flagged"
            name = "page-preview-flagged.png" if flagged_card else "page-preview.png"
            if name in {p.name for p in previews.values()}:
                continue
            with urllib.request.urlopen(
                f"{page_url}preview/{card['acquisition_id']}.png", timeout=10
            ) as response:
                previews[card["acquisition_id"]] = out / name
                previews[card["acquisition_id"]].write_bytes(response.read())
    return tuple(lines), previews


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _export(case: PhantomCase, folder: Path, rate: float) -> tuple[float, float, int]:
    """Export paced; returns wall-clock times of the first and last file and the number of files."""
    summary = export_case(case, ExportOptions(out_dir=folder, rate_files_per_s=rate))
    first = summary.paths[0].stat().st_mtime
    last = max(p.stat().st_mtime for p in summary.paths)
    return first, last, summary.file_count


def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def run_demo(
    out: Path,
    seed: int = DEFAULT_SEED,
    deviating_seed: int = DEVIATING_SEED,
    rate: float = DEFAULT_RATE,
    backend: str = AUTO,
    log: bool = True,
    stay: bool = False,
) -> DemoResult:
    def say(text: str) -> None:
        if log:
            print(text, flush=True)

    # The demo owns these folders: a second run replaces the first run's results instead of mixing with them.
    # The engine cache stays, so a second run starts from the engine the first one built and accepted.
    out.mkdir(parents=True, exist_ok=True)
    for name in ("export", "var", "received"):
        shutil.rmtree(out / name, ignore_errors=True)
    # The sCT DICOM series go where they go by default: <state folder>/dicom, here var/dicom.
    config = write_loopback_config(out, backend=backend, engine_cache=out / ENGINE_CACHE)
    endpoint, metrics_url = config.endpoint, config.metrics_url
    agent_log = out / "agent.log"
    say(f"starting the agent (log: {agent_log}); it warms up the sCT engine before it reports ready")
    process = AgentProcess(config.path, agent_log)
    listener: _Listener | None = None
    thread: threading.Thread | None = None
    try:
        say("simulating three patients' scans while it starts ...")
        passing = generate_case(seed, SimulationRequest(seed=seed).acquisition())
        deviating = generate_case(
            deviating_seed, SimulationRequest(seed=deviating_seed, settings=(DEVIATION,)).acquisition()
        )
        screws = generate_case(
            SCREWS_SEED, SimulationRequest(seed=SCREWS_SEED).acquisition(), pathologies=SCREWS
        )
        process.wait_ready(START_TIMEOUT_S)
        say(f"agent ready, publishing on {endpoint}; metrics on {metrics_url}")
        say(f"status page (the technologist's screen; open it in a browser): {config.page_url}")
        listener = _Listener(endpoint, config.snapshot, out / "received")
        thread = threading.Thread(target=listener.run, name="demo-listener")
        thread.start()
        listener.ready.wait(10)
        time.sleep(0.5)  # ZeroMQ's slow joiner: let the subscription reach the publisher

        exports = []
        series = (
            ("seed protocol", passing),
            (f"deviating ({DEVIATION} ms)", deviating),
            ("seed protocol, pedicle screws and rods", screws),
        )
        for label, case in series:
            started = time.perf_counter()
            say(f"scanner exports the {label} series at {rate:g} files/s ...")
            first, last, files = _export(case, out / "export" / f"series-{case.seed}", rate)
            exports.append((label, case, first, last, files, time.perf_counter() - started))
            # As on a scanner, the next series comes after this one has been dealt with.
            if not _wait(partial(listener.finals_at_least, len(exports)), RESULT_TIMEOUT_S):
                raise RuntimeError(f"no final verdict within {RESULT_TIMEOUT_S:.0f} s; see {agent_log}")
            published = 1 if case is passing else 2 if case is screws else 0
            if published and not _wait(partial(listener.volumes_at_least, published), RESULT_TIMEOUT_S):
                raise RuntimeError(f"no sCT volume within {RESULT_TIMEOUT_S:.0f} s; see {agent_log}")
            if published and not _wait(partial(listener.dicom_reported, published), RESULT_TIMEOUT_S):
                raise RuntimeError(f"no sCT DICOM series within {RESULT_TIMEOUT_S:.0f} s; see {agent_log}")
        metrics = _metrics(metrics_url)
        page_cards, page_previews = _page(config.page_url, len(exports), out)
        if stay:
            say(f"the agent and its status page stay up at {config.page_url}; press Ctrl-C to stop them")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        if listener is not None and thread is not None:
            listener.stop.set()
            thread.join(10)
        exit_status = process.stop(STOP_TIMEOUT_S)

    outcomes = []
    verdicts = listener.verdicts()
    finals = [s for _, s in verdicts if s.body["final"]]
    for (label, _case, first, last, files, export_s), final in zip(exports, finals, strict=True):
        mine = [(t, s) for t, s in verdicts if s.acquisition_id == final.acquisition_id]
        received = next((t for t, v, _ in listener.volumes if v.acquisition_id == final.acquisition_id), None)
        flagged = listener.flagged(str(final.acquisition_id))
        outcomes.append(
            SeriesOutcome(
                label=label,
                acquisition_id=str(final.acquisition_id),
                outcome=str(final.body["outcome"]),
                protocol_id=str(final.body["protocol_id"]),
                reasons=tuple(str(r["text"]) for r in final.body["reasons"]),
                first_verdict_outcome=str(mine[0][1].body["outcome"]),
                first_image_to_verdict_s=float(mine[0][1].body["first_image_to_verdict_s"]),
                first_file_to_reject_s=next(
                    (t - first for t, s in mine if s.body["outcome"] == "reject"), None
                ),
                files=files,
                export_s=export_s,
                last_file_to_volume_s=None if received is None else received - last,
                flagged="" if flagged is None else str(flagged.body.get("message", "")),
                flagged_regions=None if flagged is None else flagged.body.get("flagged"),
            )
        )
    _, volume, saved = listener.volumes[0]
    scores = compute_metrics(volume.hu.astype("float32"), passing.ct_hu, masks_from_ct(passing.ct_hu))
    te = passing.acquisition.echo_times_ms
    picture = render_montage(
        [
            Panel(f"MR echo 1, TE {te[0]:g} ms", passing.echoes[0]),
            Panel(
                f"SYNTHETIC CT (received), {volume.model_id} {volume.model_version}", volume.hu, CT_WINDOW_HU
            ),
            Panel("true CT (phantom)", passing.ct_hu, CT_WINDOW_HU),
        ],
        volume.geometry,
        out / "scan.png",
        caption=(
            f"phantom seed {seed}: sCT streamed by the agent over ZeroMQ, MAE {scores.mae_hu:.0f} HU in the body; "
            "mid-sagittal (top) and mid-axial (bottom)"
        ),
    )
    screws_id = outcomes[-1].acquisition_id
    folder = listener.dicom_folder(screws_id)
    flagged_picture, segmentation = flagged_outputs(
        next((v for _, v, _ in listener.volumes if v.acquisition_id == screws_id), None),
        screws,
        out / "var" / "dicom" / folder if folder else None,
        out,
    )
    previews = {p.name: p for p in page_previews.values()}
    return DemoResult(
        series=tuple(outcomes),
        picture=picture,
        received=saved,
        model=f"{volume.model_id} {volume.model_version}",
        mae_hu=scores.mae_hu,
        bone_dice_200=scores.bone_dice["200"],
        gaps=listener.gaps,
        dicom_series=None if (dicom := listener.dicom_series()) is None else out / "var" / "dicom" / dicom,
        agent_exit_status=exit_status,
        metrics=metrics,
        page_url=config.page_url,
        page_cards=page_cards,
        page_preview=previews.get("page-preview.png"),
        flagged_picture=flagged_picture,
        flagged_preview=previews.get("page-preview-flagged.png"),
        segmentation=segmentation,
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"phantom subject (default: {DEFAULT_SEED})"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help=f"export pace in files per second (default: {DEFAULT_RATE:g})",
    )
    parser.add_argument(
        "--backend", default=AUTO, choices=[AUTO, *BACKENDS], help="inference backend (default: auto)"
    )
    parser.add_argument(
        "--stay",
        action="store_true",
        help="keep the agent and its status page running after the demo, until Ctrl-C",
    )
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.seed, rate=args.rate, backend=args.backend, stay=args.stay)
    print()
    for series in result.series:
        print(
            f"{series.label}: {series.outcome.upper()} against {series.protocol_id} "
            f"({series.files} files exported in {series.export_s:.1f} s)"
        )
        print(
            f"  first image -> first verdict: {series.first_image_to_verdict_s:.3f} s "
            f"(provisional {series.first_verdict_outcome})"
        )
        if series.first_file_to_reject_s is not None:
            print(f"  first file -> rejection received: {series.first_file_to_reject_s:.3f} s")
        for reason in series.reasons:
            print(f"  reason: {reason}")
        if series.last_file_to_volume_s is not None:
            print(f"  last file -> sCT volume received: {series.last_file_to_volume_s:.2f} s")
        if series.flagged:
            print(f"  confidence: {series.flagged}")
    print(
        f"synthetic CT: {result.model}; MAE {result.mae_hu:.1f} HU in the body against the phantom's CT, "
        f"bone Dice at 200 HU {result.bone_dice_200:.3f}; sequence gaps {result.gaps}"
    )
    print(f"received: {result.received}")
    print(f"sCT DICOM CT series: {result.dicom_series or 'NOT WRITTEN (see the agent log)'}")
    print(f"picture: {result.picture}")
    print(f"status page (while the agent ran): {result.page_url}")
    for line in result.page_cards:
        print(f"  page showed {line}")
    print(f"  page preview: {result.page_preview or 'NOT SHOWN (see the agent log)'}")
    print(f"  page preview of the flagged series: {result.flagged_preview or 'NOT SHOWN (nothing flagged?)'}")
    print(f"picture of the flagged series: {result.flagged_picture or 'NOT MADE'}")
    print(
        f"DICOM Segmentation of the flagged region: {result.segmentation or 'NOT WRITTEN (nothing flagged?)'}"
    )
    print(f"agent stopped with exit status {result.agent_exit_status}")
    return 0 if result.agent_exit_status == 0 else 1
