"""What a served sCT model looks like on the wire: its Triton name, its tensors, and the identity it proves.

Both ends import this module: ``sct-agent serve`` (engines.serving.triton_server) binds models by these names and
the agent's ``triton`` backend (engines.backends.triton_client) asks for them. A window leaves the agent exactly as
a local backend would receive it (normalised float32 ``[echoes, depth, rows, cols]``, the slab halo included) and
the network output comes back whole, so the stitching, the HU scaling, the rounding and the checksums stay in the
agent and a remote pass is the same computation as a local one.

Identity: an agent runs a model only on the protocol its manifest was validated for, so a server answering with
other weights must be refused, not trusted by name. Every served model has a companion ``<name>.identity`` model
that answers a one-number probe with the served manifest's identity (JSON), asked at connect and at every
reconnect; and every inference response carries the same identity beside the output, so a server swapped between
two calls is caught on the next window.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Final

from engines.model.manifest import ModelManifest
from sct_core.errors import SctError

#: Input: normalised float32 windows ``[batch, echoes, depth, rows, cols]``.
WINDOW_INPUT: Final = "window"
#: Output: the network output ``[batch, outputs, depth, rows, cols]`` (float32: HU / hu_scale, then confidence).
OUTPUTS_OUTPUT: Final = "outputs"
#: Output of both models: the served identity as UTF-8 JSON, ``[batch, 1]`` bytes.
IDENTITY_OUTPUT: Final = "identity"
#: Input of the identity model: one int32 per request (its value is not read).
PROBE_INPUT: Final = "probe"
IDENTITY_SUFFIX: Final = ".identity"
#: Triton's own version number of every served model: our versions are strings and live in the name.
TRITON_MODEL_VERSION: Final = 1
#: Header Triton checks on restricted gRPC protocols (``--grpc-restricted-protocol``); PyTriton's name for it.
TOKEN_HEADER: Final = "triton-access-token"
GRPC_TOKEN_HEADER: Final = f"triton-grpc-protocol-{TOKEN_HEADER}"

#: Identity fields that describe the server rather than the model.
_NOT_COMPARED: Final = frozenset({"engine", "precision"})
_NOT_ALLOWED_IN_NAME = re.compile(r"[^A-Za-z0-9._-]")


def served_model_name(model_id: str, version: str) -> str:
    """The Triton model name of one model id and version (Triton names allow letters, digits, ``._-``)."""
    return _NOT_ALLOWED_IN_NAME.sub("_", f"{model_id}-{version}")


def identity_model_name(served: str) -> str:
    return served + IDENTITY_SUFFIX


@dataclass(frozen=True, slots=True)
class ServedIdentity:
    """Which validated model a server computes with; compared field by field with the agent's manifest."""

    model_id: str
    model_version: str
    weights_sha256: str
    #: "" for a model without confidence statistics.
    confidence_sha256: str
    #: Output channels: 1 (HU) or 2 (HU and confidence).
    outputs: int
    #: What computes it, e.g. "torch-cuda fp16 on cuda:0": for logs and the agent's engine info, never compared.
    engine: str = ""
    #: The server engine's precision ("fp16"): the agent reports it as its own (metrics, summaries); not compared.
    precision: str = ""

    @classmethod
    def of(cls, manifest: ModelManifest) -> ServedIdentity:
        return cls(
            model_id=manifest.model_id,
            model_version=manifest.version,
            weights_sha256=manifest.weights_sha256,
            confidence_sha256=manifest.confidence_sha256,
            outputs=manifest.network_outputs,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ServedIdentity:
        """Parse a server's identity; anything else (an old or foreign server) is a mismatch, not a crash."""
        try:
            data: Any = json.loads(text)
            return cls(
                model_id=str(data["model_id"]),
                model_version=str(data["model_version"]),
                weights_sha256=str(data["weights_sha256"]),
                confidence_sha256=str(data["confidence_sha256"]),
                outputs=int(data["outputs"]),
                engine=str(data.get("engine", "")),
                precision=str(data.get("precision", "")),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ServedModelMismatchError(
                f"served model identity: found {text!r}, expected the JSON identity of an sct-agent serve model "
                f"({type(exc).__name__}: {exc})",
                found=text,
                expected="a served identity",
            ) from None

    def differences(self, expected: ServedIdentity) -> list[str]:
        """``field: server X, manifest Y`` for each field that differs (empty: the same model)."""
        found, wanted = asdict(self), asdict(expected)
        return [
            f"{key}: server {found[key]!r}, manifest {wanted[key]!r}"
            for key in wanted
            if key not in _NOT_COMPARED and found[key] != wanted[key]
        ]

    def check(self, expected: ServedIdentity, server: str) -> None:
        """Refuse a server whose model is not the one the agent validated against, naming both."""
        differences = self.differences(expected)
        if differences:
            raise ServedModelMismatchError(
                f"Triton server {server} serves {self.model_id} {self.model_version} (weights "
                f"{self.weights_sha256[:16]}…), not the manifest's {expected.model_id} {expected.model_version} "
                f"(weights {expected.weights_sha256[:16]}…): "
                + "; ".join(differences)
                + "; refusing its sCT",
                found=self.to_json(),
                expected=expected.to_json(),
            )


class ServedModelMismatchError(SctError, RuntimeError):
    """The server computes with another model (id, version, weights or confidence statistics) than the manifest's."""

    def __init__(self, message: str, *, found: object, expected: str) -> None:
        super().__init__(message, attribute="triton.model", found=found, expected=expected)
