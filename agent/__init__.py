"""sct-edge-agent: turns a dual-echo 3D spoiled-GRE MRI acquisition into a synthetic CT at the scanner's edge.

The data flows one way through the stage packages, in this order: ``ingest`` (watch the export folder, read
headers, group and place images), ``validation`` (judge against the sequence protocols; may the model run?),
``inference`` (slabs as slices arrive, the engine), ``publish`` (ZeroMQ with snapshots and CURVE) and
``dicom_out`` (the sCT as a DICOM CT series). ``pipeline.py`` composes them, ``service.py`` starts and stops
them, ``ops`` holds the side services (configuration, journal, metrics, systemd), ``client`` the subscriber
library robots import, and ``cli`` the ``sct-agent`` command. Records passed between stages are in
``records.py``, fixed vocabularies in ``vocabulary.py``; docs/architecture.md explains the rest.
"""

__version__ = "0.1.0"
