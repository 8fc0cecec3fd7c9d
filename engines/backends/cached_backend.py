"""Backends whose engine is compiled once, kept on disk and accepted before use (AOTInductor, CUDA, TensorRT).

The flow every such backend shares, so each one only says how to build, save and load its engine:

1. compute the :class:`EngineKey` for this machine, model, window and precision;
2. look in the cache: an engine whose key differs, whose file hash does not match, or that never passed is
   refused with a message naming which (kept in ``refusals`` and logged) and removed;
3. load a cached engine, or build one (``sct-agent engine build`` or the first start) into a scratch folder;
4. run acceptance (``acceptance.py``) on the loaded engine: only an engine that reproduces the fp32 reference
   within the manifest's tolerance is used; a freshly built one that fails is refused with
   :class:`BackendUnavailableError`, so ``auto`` moves on to the next backend. A single-file engine whose hash
   matches is the same bytes that passed, so its recorded figures are checked against the manifest's current
   tolerance instead of running it again; a compiler-cache engine (CUDA inductor) has no hash and is run on the
   stored sample at every start.

A start with a valid cached engine therefore costs loading it (plus, for a compiler cache, one inference).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from engines.backends.acceptance import AcceptanceResult, accept, acceptance_sample
from engines.backends.base import BackendOptions, BackendUnavailableError, InferenceBackend
from engines.backends.engine_cache import (
    EngineKey,
    EngineRecord,
    EngineRefused,
    EngineStore,
    default_cache_dir,
)
from engines.model.manifest import ModelManifest

logger = logging.getLogger(__name__)

#: ``CachedEngineState.state``: a valid engine whose recorded acceptance holds (the start loads it in seconds).
ACCEPTED = "accepted"
#: A valid compiler cache (no single file to hash): the start loads it and runs acceptance on it.
RUN_AT_START = "accepted at start"
#: No engine for this key: the start builds one.
MISSING = "missing"
#: An engine the start would refuse, remove and build again.
REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class CachedEngineState:
    """What the engine cache holds for one backend, precision and window on this machine (``inspect_cache``)."""

    backend: str
    precision: str
    window: tuple[int, ...]
    folder: Path
    #: ACCEPTED, RUN_AT_START, MISSING or REFUSED.
    state: str
    #: The acceptance figures when accepted; why not otherwise.
    reason: str
    record: EngineRecord | None
    #: ``build_s`` of whatever record the folder holds, refused or not; None without one.
    previous_build_s: float | None

    @property
    def ready(self) -> bool:
        """The start loads this engine instead of building one."""
        return self.state in (ACCEPTED, RUN_AT_START)


class CachedEngineBackend(InferenceBackend):
    #: File name of the engine inside its folder.
    artefact: ClassVar[str]
    #: False when the artefact is a compiler's cache folder rather than one file (no hash to check).
    hashed: ClassVar[bool] = True
    #: Acceptance runs a full window, so ``load`` needs no separate warm-up.
    warmed_by_prepare = True

    #: Set by ``_prepare``: "cached" (a valid engine was loaded) or "built".
    origin: str = ""
    refusals: list[str]
    record: EngineRecord | None = None
    acceptance: AcceptanceResult | None = None

    def _prepare(self) -> None:
        self.refusals = []
        self._require()
        cache_dir = self.options.cache_dir or default_cache_dir()
        store = self._store(cache_dir)
        record = self._cached(store)
        if record is not None and self.hashed:
            # The very bytes that passed acceptance on this machine compute the very numbers they computed then;
            # the recorded figures are held against the model's tolerance as it stands now.
            recorded = AcceptanceResult.from_record(record.acceptance, self.manifest.backend_tolerance_hu)
            if recorded.passed:
                self._load(store.artefact_path)
                self._use_cached(store, record, recorded)
                return
            self._refuse(
                store, f"cached engine {store.folder} failed acceptance: recorded {recorded.describe()}"
            )
            record = None
        self._progress("acceptance sample", 0.0)
        sample = acceptance_sample(self.manifest, self.input_shape, cache_dir)
        if record is not None:
            # A compiler's cache has no single file to hash: acceptance runs at every start (one inference).
            self._load(store.artefact_path)
            result = accept(self, sample)
            if result.passed:
                self._use_cached(store, record, result)
                return
            self._refuse(store, f"cached engine {store.folder} failed acceptance: {result.describe()}")
        started = time.perf_counter()
        scratch = store.scratch(in_place=not self.hashed)
        committed = False
        try:
            self._progress("compiling", 0.1)
            self._build(scratch / self.artefact)
            self._progress("loading", 0.8)
            self._load(scratch / self.artefact)
            self._progress("acceptance", 0.9)
            result = accept(self, sample)
            if not result.passed:
                raise BackendUnavailableError(
                    f"{self.name} {self.precision.value}: the engine just built failed acceptance: "
                    f"{result.describe()}",
                    found=result.mean_abs_hu,
                    expected=f"mean |ΔHU| <= {result.tolerance_hu}",
                )
            build_s = time.perf_counter() - started
            self.record = store.commit(
                scratch, hashed=self.hashed, build_s=build_s, acceptance=result.to_dict()
            )
            committed = True
        finally:
            if not committed or scratch != store.folder:
                _remove(scratch)
        self._after_commit(store.artefact_path)
        self.origin, self.acceptance = "built", result
        logger.info(
            "%s: built engine %s in %.1f s, accepted: %s", self.name, store.folder, build_s, result.describe()
        )
        self._progress("ready", 1.0)

    @classmethod
    def inspect_cache(
        cls, manifest: ModelManifest, input_shape: tuple[int, int, int, int], options: BackendOptions
    ) -> CachedEngineState:
        """What ``load`` would find in the cache, found without building, loading or removing anything.

        For ``sct-agent doctor``: the same key and the same checks as ``_prepare`` (record, key fields, file hash,
        recorded acceptance against the manifest's tolerance now), stopping where ``_prepare`` would load or
        build. Raises :class:`BackendUnavailableError` where ``load`` would (no GPU, no compiler library).
        """
        backend = cls(manifest, input_shape, options)
        try:
            backend._require()
            store = backend._store(options.cache_dir or default_cache_dir())
        finally:
            backend.close()

        def state(verdict: str, reason: str = "", record: EngineRecord | None = None) -> CachedEngineState:
            return CachedEngineState(
                backend=cls.name,
                precision=backend.precision.value,
                window=input_shape,
                folder=store.folder,
                state=verdict,
                reason=reason,
                record=record,
                previous_build_s=_recorded_build_s(store),
            )

        try:
            record = store.check()
        except EngineRefused as refused:
            return state(REFUSED, str(refused))
        if record is None:
            return state(MISSING, f"no engine in {store.folder}")
        if not cls.hashed:
            return state(
                RUN_AT_START, "a compiler cache: acceptance runs on the stored window at start", record
            )
        try:
            recorded = AcceptanceResult.from_record(record.acceptance, manifest.backend_tolerance_hu)
        except (KeyError, TypeError, ValueError) as error:
            return state(REFUSED, f"cached engine {store.folder}: acceptance record unreadable ({error})")
        if not recorded.passed:
            return state(
                REFUSED, f"cached engine {store.folder} failed acceptance: recorded {recorded.describe()}"
            )
        return state(ACCEPTED, recorded.describe(), record)

    def _store(self, cache_dir: Path) -> EngineStore:
        """The engine folder for this machine's key; ``_require`` has run (it sets the device and the compiler)."""
        key = EngineKey.current(
            backend=self.name,
            precision=self.precision.value,
            window=self.input_shape,
            manifest=self.manifest,
            device=self.device,
            compiler=self._compiler_version(),
        )
        return EngineStore(cache_dir, key, self.artefact)

    def _use_cached(self, store: EngineStore, record: EngineRecord, result: AcceptanceResult) -> None:
        self.origin, self.record, self.acceptance = "cached", record, result
        logger.info("%s: cached engine %s accepted: %s", self.name, store.folder, result.describe())
        self._progress("ready", 1.0)

    def _cached(self, store: EngineStore) -> EngineRecord | None:
        try:
            return store.check()
        except EngineRefused as refused:
            self._refuse(store, str(refused))
            return None

    def _refuse(self, store: EngineStore, message: str) -> None:
        logger.warning("%s; building it again", message)
        self.refusals.append(message)
        store.clear()

    def _progress(self, step: str, fraction: float) -> None:
        if self.options.progress is not None:
            self.options.progress(f"{self.name} {self.precision.value}: {step}", fraction)

    def _details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"engine": self.origin, "refusals": list(self.refusals)}
        if self.acceptance is not None:
            details["acceptance"] = self.acceptance.to_dict()
        if self.record is not None:
            details["engine_build_s"] = self.record.build_s
        return details

    @abstractmethod
    def _require(self) -> None:
        """Raise :class:`BackendUnavailableError` (one line) when the libraries or the device are absent."""

    @abstractmethod
    def _build(self, path: Path) -> None:
        """Compile the engine and save it at ``path``."""

    @abstractmethod
    def _load(self, path: Path) -> None:
        """Load the engine saved at ``path`` so that ``_run`` uses it."""

    def _after_commit(self, path: Path) -> None:
        """The engine now lives at ``path`` (its scratch folder was moved into place)."""

    def _compiler_version(self) -> str:
        return ""


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _recorded_build_s(store: EngineStore) -> float | None:
    """How long the engine in ``store``'s folder took to build, from its record, even when that engine is refused
    (built for another driver, say): the best estimate of how long this machine takes to build it again."""
    try:
        return float(json.loads(store.record_path.read_text())["build_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
