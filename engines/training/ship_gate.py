"""A new model replaces the shipped one only if it is better on every headline metric of the same phantoms.

Both models run the same held-out evaluation phantoms (seeds from ``EVALUATION_SEED_BASE``, generated once and
given to both, scanned with the seed protocol) on the fp32 eager reference backend. The candidate must beat the current model on each headline
metric; a tie is not a win. A refusal names every metric, both values and which model is better. ``force``
ships anyway and is recorded as such: a deliberate override must be visible in the manifest that ships.

The comparison is stored in the candidate's folder (``ship_comparison.json``) keyed on both weights hashes and the
seeds, so a refused ship followed by a forced one does not evaluate the phantoms again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.backends.base import BackendOptions
from engines.backends.torch_cpu import TorchEagerBackend
from engines.evaluation.evaluate import check_held_out, evaluation_seeds
from engines.evaluation.metrics import SctMetrics, compute_metrics, masks_from_labels, summarise
from engines.inference.engine import SctEngine
from engines.model.manifest import MANIFEST_NAME, ModelManifest
from engines.phantom.acquisition import SEED_PROTOCOL, Acquisition
from engines.phantom.generate import generate_case
from sct_core.errors import SctError

logger = logging.getLogger(__name__)

#: Held-out phantoms both models are measured on (those of the evaluation table in docs/model.md).
SHIP_EVALUATION_SUBJECTS = 5
COMPARISON_NAME = "ship_comparison.json"
BACKEND = "torch-eager fp32"


@dataclass(frozen=True, slots=True)
class Headline:
    """One headline metric: its name in messages, its key in the evaluation summary, and which way is better."""

    name: str
    key: str
    unit: str
    higher_is_better: bool = False
    #: Compare the absolute value (a bias is as bad either way).
    absolute: bool = False

    def value(self, summary: dict[str, dict[str, float]]) -> float:
        mean = float(summary[self.key]["mean"])
        return abs(mean) if self.absolute else mean

    def candidate_better(self, candidate: float, current: float) -> bool:
        if not (math.isfinite(candidate) and math.isfinite(current)):
            return False
        return candidate > current if self.higher_is_better else candidate < current


HEADLINE_METRICS = (
    Headline("body MAE", "mae_hu", "HU"),
    Headline("|ME|", "me_hu", "HU", absolute=True),
    Headline("cortical MAE", "mae_by_tissue.cortical_bone", "HU"),
    Headline("trabecular MAE", "mae_by_tissue.trabecular_bone", "HU"),
    Headline("bone Dice @200 HU", "bone_dice.200", "", higher_is_better=True),
)


class ShipRefusedError(SctError, RuntimeError):
    """The candidate does not beat the shipped model on every headline metric."""


@dataclass(frozen=True, slots=True)
class ShipComparison:
    """Headline values of both models on the same phantoms (means over the phantoms)."""

    candidate: dict[str, str]  # label, weights_sha256
    current: dict[str, str]
    seeds: tuple[int, ...]
    candidate_values: dict[str, float]
    current_values: dict[str, float]
    #: Fields of the phantoms' acquisition that differ from the seed protocol (none for a real ship decision).
    protocol_changes: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def verdicts(self) -> list[tuple[Headline, float, float, bool]]:
        """(metric, candidate value, current value, candidate better) for each headline metric."""
        out = []
        for h in HEADLINE_METRICS:
            cand, cur = self.candidate_values[h.key], self.current_values[h.key]
            out.append((h, cand, cur, h.candidate_better(cand, cur)))
        return out

    @property
    def candidate_better(self) -> bool:
        return all(better for *_, better in self.verdicts)

    def lines(self) -> list[str]:
        out = []
        for h, cand, cur, better in self.verdicts:
            fmt = ".3f" if h.higher_is_better else ".1f"
            unit = f" {h.unit}" if h.unit else ""
            winner = "candidate better" if better else ("equal" if cand == cur else "current better")
            out.append(f"{h.name}: candidate {cand:{fmt}}{unit}, current {cur:{fmt}}{unit}: {winner}")
        return out

    def matches(self, other: ShipComparison) -> bool:
        """Whether this comparison measured the same two weights on the same phantoms as ``other`` would."""
        return (
            self.candidate.get("weights_sha256") == other.candidate.get("weights_sha256")
            and self.current.get("weights_sha256") == other.current.get("weights_sha256")
            and self.seeds == other.seeds
            and self.protocol_changes == other.protocol_changes
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": BACKEND,
            "phantom_seeds": list(self.seeds),
            "protocol": "seed protocol" + (f" with {self.protocol_changes}" if self.protocol_changes else ""),
            "protocol_changes": self.protocol_changes,
            "metric": "mean over the phantoms; |ME| is the absolute value of the mean ME (CT - sCT)",
            "candidate": {**self.candidate, "values": self.candidate_values},
            "current": {**self.current, "values": self.current_values},
            "verdicts": [
                {"metric": h.name, "key": h.key, "candidate": c, "current": r, "candidate_better": b}
                for h, c, r, b in self.verdicts
            ],
            "candidate_better_on_every_metric": self.candidate_better,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShipComparison:
        def identity(side: dict[str, Any]) -> dict[str, str]:
            return {k: str(v) for k, v in side.items() if k != "values"}

        return cls(
            candidate=identity(data["candidate"]),
            current=identity(data["current"]),
            seeds=tuple(int(s) for s in data["phantom_seeds"]),
            candidate_values={k: float(v) for k, v in data["candidate"]["values"].items()},
            current_values={k: float(v) for k, v in data["current"]["values"].items()},
            protocol_changes=dict(data.get("protocol_changes", {})),
        )


def compare_models(
    candidate: ModelManifest,
    current: ModelManifest,
    seeds: list[int],
    *,
    acquisition: Acquisition = SEED_PROTOCOL,
    threads: int | None = None,
    report: Callable[[str], None] = logger.info,
) -> ShipComparison:
    """Measure both models on the same phantoms: each phantom generated once, one engine loaded at a time."""
    cases = []
    for seed in seeds:
        cases.append(generate_case(seed, acquisition))
        report(f"ship comparison: phantom {seed} generated")
    values: list[dict[str, float]] = []
    for role, manifest in (("candidate", candidate), ("current", current)):
        engine = SctEngine.load(
            manifest,
            backend=TorchEagerBackend.name,
            options=BackendOptions(threads=threads),
            in_plane=(cases[0].echoes.shape[2], cases[0].echoes.shape[3]),
        )
        try:
            check_held_out(engine, seeds)
            metrics: list[SctMetrics] = []
            for case in cases:
                m = compute_metrics(
                    engine.infer_volume(case.echoes), case.ct_hu, masks_from_labels(case.labels)
                )
                metrics.append(m)
                report(f"ship comparison: {role} on phantom {case.seed}: MAE {m.mae_hu:.1f} HU")
        finally:
            engine.close()
        summary = summarise(metrics)
        values.append({h.key: h.value(summary) for h in HEADLINE_METRICS})
    return ShipComparison(
        candidate=_identity(candidate),
        current=_identity(current),
        seeds=tuple(seeds),
        candidate_values=values[0],
        current_values=values[1],
        protocol_changes=_protocol_changes(acquisition),
    )


def ship_decision(
    run_dir: Path,
    dest: Path,
    *,
    force: bool = False,
    subjects: int = SHIP_EVALUATION_SUBJECTS,
    acquisition: Acquisition = SEED_PROTOCOL,
    threads: int | None = None,
    report: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Decide whether the model in ``run_dir`` may replace the one in ``dest``; returns the record to keep.

    Raises :class:`ShipRefusedError` (after storing the comparison) when it may not and ``force`` is off.
    ``acquisition`` is the seed protocol for a real decision; tests compare on a smaller field of view.
    """
    candidate = ModelManifest.load(run_dir)
    if not (dest / MANIFEST_NAME).exists():
        return {
            "decision": "shipped",
            "forced": False,
            "comparison": None,
            "note": f"no model in {dest} before",
        }
    current = ModelManifest.load(dest)
    seeds = evaluation_seeds(subjects)
    wanted = ShipComparison(
        candidate=_identity(candidate),
        current=_identity(current),
        seeds=tuple(seeds),
        candidate_values={},
        current_values={},
        protocol_changes=_protocol_changes(acquisition),
    )
    comparison = _stored(run_dir, wanted)
    if comparison is None:
        comparison = compare_models(
            candidate, current, seeds, acquisition=acquisition, threads=threads, report=report
        )
        _write_json(run_dir / COMPARISON_NAME, comparison.to_dict())
    else:
        report(f"ship comparison: reusing {run_dir / COMPARISON_NAME} (same weights and phantoms)")
    for line in comparison.lines():
        report(line)
    better = comparison.candidate_better
    record = {
        "decision": "shipped" if better or force else "refused",
        "forced": force and not better,
        "comparison": comparison.to_dict(),
    }
    if not better and not force:
        worse = [line for line in comparison.lines() if not line.endswith("candidate better")]
        raise ShipRefusedError(
            f"{candidate.label} does not beat {current.label} in {dest} on every headline metric of "
            f"{len(seeds)} held-out phantoms (seeds {seeds[0]}..{seeds[-1]}): "
            + "; ".join(comparison.lines())
            + " (use --force to ship anyway; it is recorded in the manifest)",
            attribute="headline metrics",
            found="; ".join(worse),
            expected="the candidate better on every headline metric",
        )
    if record["forced"]:
        logger.warning("shipping %s although it is not better on every metric (forced)", candidate.label)
    return record


def _identity(manifest: ModelManifest) -> dict[str, str]:
    return {"label": manifest.label, "weights_sha256": manifest.weights_sha256}


def _protocol_changes(acquisition: Acquisition) -> dict[str, Any]:
    seed, this = dataclasses.asdict(SEED_PROTOCOL), dataclasses.asdict(acquisition)
    return {k: json.loads(json.dumps(v, default=str)) for k, v in this.items() if v != seed[k]}


def _stored(run_dir: Path, wanted: ShipComparison) -> ShipComparison | None:
    path = run_dir / COMPARISON_NAME
    if not path.exists():
        return None
    try:
        stored = ShipComparison.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None
    return stored if stored.matches(wanted) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
