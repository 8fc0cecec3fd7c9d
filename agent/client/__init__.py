"""The subscriber library a navigation robot imports: ``from agent.client import SctClient``.

It needs pyzmq and numpy only (no torch, no engines): the client, the wire format it decodes
(:mod:`agent.publish.wire`), the CURVE key files and the volume geometry (:mod:`sct_core.geometry`) are all
plain Python over those two. ``tests/test_install.py`` imports it in an environment without torch.
"""

from agent.client.subscriber import Gap, ReceivedVolume, SctClient
from agent.publish.curve_keys import CurveClient, curve_client
from agent.publish.wire import ChecksumError, SchemaVersionError, WireError
from sct_core.geometry import VolumeGeometry

__all__ = [
    "ChecksumError",
    "CurveClient",
    "Gap",
    "ReceivedVolume",
    "SchemaVersionError",
    "SctClient",
    "VolumeGeometry",
    "WireError",
    "curve_client",
]
