"""Which acquisition an image belongs to.

General tools key on SeriesInstanceUID and get multi-echo exports wrong (docs/vendors.md, Grouping):

- Philips writes the classic export, the Enhanced export and a Raw Data object of one scan under one series
  UID. The key includes the SOP class, so the classic and Enhanced forms are two acquisitions, each judged on
  its own (raw data never gets here: the header reader skips objects that are not MR images).
- Siemens XA "interoperability" exports (ImageType contains MFSPLIT) write each echo of one acquisition as its
  own series, without EchoNumbers. Those series share the study, the frame of reference, SeriesTime,
  ProtocolName, the sequence name and the geometry; that is their key instead of the series UID, so the two
  echoes meet in one acquisition and a two-echo protocol can pass.
- Magnitude, phase and field-map images of one series stay in one acquisition; the assembler keeps them apart
  by image kind (agent.ingest.vendor_conventions.image_kind) and gives the model the magnitude images only.

Only the MFSPLIT marker joins series: two series that merely look alike (a repeat of the same protocol after
the patient moved) must stay two acquisitions.

The id is a digest: opaque and stable, safe on the wire and in logs, unlike the UIDs it comes from.
"""

from __future__ import annotations

import hashlib

from agent.ingest.header_reader import ObjectHeader

#: ImageType token of a Siemens XA classic object split out of an Enhanced one (one series per echo).
SPLIT_SERIES_TOKEN = "MFSPLIT"
#: Geometry in a split key is compared at this many decimals (mm, direction cosines): the split series of one
#: acquisition carry identical strings, so this only absorbs float formatting.
_KEY_DECIMALS = 4


def is_split_series(header: ObjectHeader) -> bool:
    return SPLIT_SERIES_TOKEN in header.image_type


def acquisition_key(header: ObjectHeader) -> str:
    """The text that identifies the acquisition (before hashing); see the module docstring."""
    if is_split_series(header):
        geometry = (
            header.rows,
            header.columns,
            *(round(v, _KEY_DECIMALS) for v in header.pixel_spacing_mm),
            *(round(v, _KEY_DECIMALS) for v in header.image_orientation),
        )
        parts: tuple[object, ...] = (
            "split",
            header.study_instance_uid,
            header.frame_of_reference_uid,
            header.sop_class_uid,
            header.series_time,
            header.protocol_name,
            header.sequence.sequence_name,
            *geometry,
        )
    else:
        parts = (header.study_instance_uid, header.series_instance_uid, header.sop_class_uid)
    return "|".join(str(p) for p in parts)


def acquisition_id_for(header: ObjectHeader) -> str:
    return hashlib.sha256(acquisition_key(header).encode()).hexdigest()[:16]
