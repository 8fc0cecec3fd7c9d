"""Every fixed vocabulary of the agent, in one place: the closed sets of names records, metric labels, the
journal, log lines and the wire use.

Each is a :class:`~enum.StrEnum`, so a member is its own string (``Outcome.PASS == "pass"``): it goes into JSON,
SQLite and Prometheus labels as it is, and a value read back from any of them converts with ``Outcome(text)``,
which refuses a name outside the set. Adding a member here is the one change a new kind of outcome needs.
"""

from __future__ import annotations

from enum import StrEnum

# ------------------------------------------------------------------------------------------------- ingest


class ArrivalSource(StrEnum):
    """How the watcher (or the storage SCP) learnt that a file is complete."""

    STARTUP_SCAN = "startup-scan"  # already in the folder when the agent started
    EVENT = "event"  # inotify close-write or moved-to (native observer)
    STABLE = "stable"  # size and mtime unchanged across two polls (polling observer, or an event-less write)
    RECEIVED = (
        "c-store"  # received by the storage SCP and written to <state>/received (agent.ingest.store_scp)
    )


class SkipReason(StrEnum):
    """Why a path is never handed to ``sink``; a bounded label, safe for metrics."""

    HIDDEN = "hidden-name"  # the name, or a folder on the way to it, starts with '.'
    TEMPORARY = "temporary-name"  # TEMP_SUFFIXES / TEMP_PREFIXES: an export or copy still in progress
    DICOMDIR = "dicomdir"
    EMPTY = "zero-byte"  # stayed empty for the stability window
    DIRECTORY = "directory"


class ObserverKind(StrEnum):
    """Which watchdog observer notices changes."""

    NATIVE = "native"  # inotify: close-write and moved-to events (Linux, local disk)
    POLLING = "polling"  # rescans at poll_interval_s: CIFS/NFS shares give no inotify events


class FileOutcome(StrEnum):
    """Outcomes of one file, for the journal and the files counter."""

    ACCEPTED = "accepted"
    SKIPPED = "skipped"
    BAD = "bad"
    DUPLICATE = "duplicate"


class EndedBy(StrEnum):
    """What ended an acquisition (``AcquisitionView.ended_by``)."""

    OPEN = ""  # still open
    COUNT = "count"  # every image its own counts announce is present
    QUIET = "quiet"  # the quiet-period timer ran out before the counts were met


class UpdateKind(StrEnum):
    """Why the assembler emits an update."""

    IMAGES = "images"  # new images arrived; the acquisition is still open
    COMPLETE = "complete"  # every expected image is present
    QUIET = "quiet"  # nothing arrived for the quiet period and the acquisition is not complete


class Vendor(StrEnum):
    SIEMENS = "Siemens"
    GE = "GE"
    PHILIPS = "Philips"
    OTHER = "other"


class ImageKind(StrEnum):
    """What the pixel values of one image are. The model takes magnitude images only."""

    MAGNITUDE = "magnitude"
    PHASE = "phase"
    REAL = "real"
    IMAGINARY = "imaginary"
    FIELD_MAP = "field map"
    #: No attribute says (the image may still be magnitude; the validator treats it as not proven).
    UNSTATED = "unstated"


# --------------------------------------------------------------------------------------------- validation


class Outcome(StrEnum):
    """A verdict's outcome."""

    PASS = "pass"
    REJECT = "reject"
    INCOMPLETE = "incomplete"


class Category(StrEnum):
    """Bounded reason categories (metrics labels): one per kind of problem a technologist fixes differently."""

    SEQUENCE = "sequence"
    ECHOES = "echoes"
    TIMING = "timing"
    BANDWIDTH = "bandwidth"
    FIELD = "field"
    GEOMETRY = "geometry"
    IMAGE = "image"
    COMPLETENESS = "completeness"
    CONSISTENCY = "consistency"


class RuleKind(StrEnum):
    """How an attribute is compared; each attribute has exactly one kind."""

    TEXT = "text"  # equals = "3D"
    TOKENS = "tokens"  # includes / excludes token sets
    ABSENT = "absent"  # absent = true
    NUMBER = "number"  # value + tolerance, or min / max / greater_than / less_than, with unit
    COUNT = "count"  # equals, or min / max (integers)
    VECTOR = "vector"  # value = [..] + tolerance (number or list), with unit
    ORIENTATION = "orientation"  # equals = "sagittal", max_oblique_deg


# ------------------------------------------------------------------------------------ inference and output


class StreamAction(StrEnum):
    """What the streamer tells the engine stage about an acquisition besides its slabs."""

    FINALIZE = "finalize"  # the final verdict passed: publish the volume once every slab is done
    CANCEL = "cancel"  # drop what was done (final verdict failed, or the grid had to be placed again)


class AcquisitionState(StrEnum):
    """Where an acquisition is in its life. ``FINISHED_STATES`` need nothing more after a restart."""

    PASSED = "passed"  # final verdict passed; slabs may be in flight
    REJECTED = "rejected"
    INCOMPLETE = "incomplete"
    PUBLISHED = "published"  # every slab and the volume went out


class StatusKind(StrEnum):
    """The ``kind`` of a message on the status topic (docs/protocol.md lists the body of each)."""

    VERDICT = "verdict"
    PROGRESS = "progress"
    ERROR = "error"
    #: Reserved on the wire (docs/protocol.md): subscribers accept them, the agent does not send them yet.
    COMPLETE = "complete"
    SKIPPED = "skipped"
    #: An acquisition whose slabs were streamed was dropped (final verdict failed, grid placed again).
    CANCELLED = "cancelled"
    #: The sCT DICOM series was written, stored or failed.
    DICOM = "dicom"
    #: A new acquisition was not taken (too little free disk space); it is taken when space returns.
    REFUSED = "refused"
    #: The export folder became unavailable (deleted, unreadable, unmounted) or was watched again.
    WATCH = "watch"
    #: Images of an acquisition arrived: how many of how many (schema 1.3), for a technologist's progress bar.
    RECEIVED = "received"
    #: The regions of a finished sCT volume the model's confidence says not to trust (schema 1.4): sent once per
    #: published volume, with ``flagged`` 0 when it was checked and nothing was found, and ``checked`` false when
    #: the model has no confidence output.
    FLAGGED = "flagged"


# ---------------------------------------------------------------------------------------------- operations


class LogFormat(StrEnum):
    """``logging.format``: how log lines are written to stderr."""

    AUTO = "auto"  # journal when stderr is the systemd journal (JOURNAL_STREAM), text otherwise
    TEXT = "text"  # timestamp, level, logger, thread, message: for a terminal
    JSON = "json"  # one JSON object per line with structured fields: for log shippers
    JOURNAL = "journal"  # sd-daemon <N> priority prefix, no timestamp (journald adds one)


class FileNames(StrEnum):
    """``logging.file_names``: how log lines and messages name a file of the export folder."""

    HASH = "hash"  # file:<first 10 hex digits of the SHA-256 of the path relative to the export folder>
    RELATIVE = "relative"  # the path relative to the export folder (file names often carry patient names)


class AcquisitionEnd(StrEnum):
    """The ``outcome`` of an acquisition's one canonical log line (``event`` "acquisition_end")."""

    PUBLISHED = "published"  # the sCT volume went out (and the DICOM series was written, when configured)
    REJECTED = "rejected"  # the final verdict failed a protocol rule
    INCOMPLETE = "incomplete"  # the acquisition ended without every image it announced
    NOT_INFERRED = "not_inferred"  # it passed, but the model may not run on it (protocol not the model's)
    FAILED = "failed"  # a stage failed on it (the engine, a pixel read); the error is logged and published


class LogEvent(StrEnum):
    """The ``event`` field of structured log lines about an acquisition or a file (JSON format)."""

    FILE = "file"  # a file was skipped or bad
    VERDICT = "verdict"  # an acquisition's final verdict
    STREAM_CANCELLED = "stream_cancelled"  # slabs already streamed were dropped
    VOLUME = "volume"  # the sCT volume was stitched
    FLAGGED = "flagged"  # the sCT volume's confidence was checked: the regions not to trust, or none
    ARCHIVE = "archive"  # the volume could not be kept for restarts
    DICOM = "dicom"  # the sCT DICOM series was written, stored or failed
    STAGE_ERROR = "stage_error"  # a stage's handler raised
    ACQUISITION_END = "acquisition_end"  # the one canonical line per acquisition
    SUMMARY_DROPPED = "summary_dropped"  # more acquisitions open than the summaries keep


# --------------------------------------------------------------------------------------------- status page


class PageState(StrEnum):
    """Where an acquisition is, as the technologist's status page says it (agent/status_page/board.py)."""

    RECEIVING = "receiving"  # images arriving, judged as they come
    JUDGING = "judging"  # seen, not yet judged (or ended and waiting for the final verdict)
    STREAMING = "streaming"  # passed: sCT slabs are being computed and sent
    PUBLISHED = "published"  # the sCT volume went out
    REJECTED = "rejected"  # a protocol rule failed: fix the console and scan again
    INCOMPLETE = "incomplete"  # images announced but never received: send the series again
    FAILED = "failed"  # a stage failed on it (engine, pixel read): no sCT
    NOT_INFERRED = "not inferred"  # passed a protocol the model is not validated for: no sCT
    WAITING = "waiting"  # not taken yet: too little free disk space
