"""The ``triton`` backend: each slab window is computed by a Triton Inference Server that ``sct-agent serve`` runs
(engines.serving.triton_server), on this host or on a GPU server shared by many scanners (docs/scale-out.md).

The agent keeps everything around the network: the volume, the halo gather and normalisation before it, the HU
scaling, rounding, stitching and checksums after it. What crosses the link is the float32 window a local backend
would receive and the float32 network output it would return, so a remote pass is the same computation (equal
to a local fp32 pass where the server runs fp32) and the slab plan's exactness holds across the network. gRPC
carries it: Triton and tritonclient both raise gRPC's 4 MiB default message limit to 2 GiB, and a window of the
shipped model (2 × 64 × 344 × 344 float32) is 61 MiB.

Trust: before the first window and after every reconnect the server's identity model must name the manifest's
model id, version, weights and confidence statistics (engines.serving.contract); every response carries the
identity again. A server with another model is refused with both identities named: at start the agent does not
start; later the window fails (or runs locally, below).

Faults: a server that is down, too slow (``timeout_s``) or at capacity is retried ``attempts`` times with a
doubling backoff, reconnecting (and re-verifying) each time; then the window fails with a
:class:`RemoteInferenceError` naming the server, the outcome and the time spent, which fails that series, not the
agent (agent.inference.engine_stage). With a ``fallback`` backend the window is computed locally instead and the
server is tried again after ``retry_s`` (doubling to ``max_retry_s`` while it stays down), so a scanner keeps its
sCT while the GPU server is away. A server down when the agent starts is not fatal: the link connects when it is
back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from engines.backends.base import BackendOptions, BackendUnavailableError, InferenceBackend, Precision
from engines.backends.remote_link import (
    RETRIED,
    RemoteInferenceError,
    RemoteLink,
    RemoteOutcome,
)
from engines.backends.triton_shared_memory import SharedMemoryWindows
from engines.model.manifest import ModelManifest
from engines.serving.contract import (
    GRPC_TOKEN_HEADER,
    IDENTITY_OUTPUT,
    OUTPUTS_OUTPUT,
    PROBE_INPUT,
    WINDOW_INPUT,
    ServedIdentity,
    ServedModelMismatchError,
    identity_model_name,
    served_model_name,
)

if TYPE_CHECKING:
    import tritonclient.grpc as grpcclient

logger = logging.getLogger(__name__)

#: Patience of the identity probe: it computes nothing, so a server that takes longer is not answering.
PROBE_TIMEOUT_S: Final = 10.0
#: gRPC's message limit as Triton and tritonclient set it (INT32_MAX); a bigger window cannot be sent.
MAX_MESSAGE_BYTES: Final = 2**31 - 1
#: Fragments of Triton's error text that mean "retry later" although the status code says otherwise.
_CAPACITY_TEXT: Final = ("exceeds maximum queue size", "queue is full")
_NOT_YET_LOADED_TEXT: Final = ("unknown model", "is not ready", "not found")


def classify(status: str, message: str) -> RemoteOutcome:
    """The outcome of a failed call from tritonclient's status (``StatusCode.X``) and message; the first rule that
    matches decides (a restricted protocol answers UNAVAILABLE, a full queue too: the text tells them apart)."""
    text, code = message.lower(), status.rsplit(".", 1)[-1].upper()
    for outcome, codes, fragments in _RULES:
        if code in codes or any(fragment in text for fragment in fragments):
            return outcome
    return RemoteOutcome.ERROR


#: (outcome, gRPC status codes, message fragments), in order.
_RULES: Final = (
    (RemoteOutcome.REFUSED, ("UNAUTHENTICATED", "PERMISSION_DENIED"), ("restricted",)),
    (RemoteOutcome.CAPACITY, ("RESOURCE_EXHAUSTED",), _CAPACITY_TEXT),
    (RemoteOutcome.TIMEOUT, ("DEADLINE_EXCEEDED",), ("deadline exceeded",)),
    # A server restarting opens its port before its models are loaded: come back later.
    (RemoteOutcome.UNAVAILABLE, ("UNAVAILABLE", "CANCELLED"), _NOT_YET_LOADED_TEXT),
    (RemoteOutcome.REFUSED, ("INVALID_ARGUMENT",), ()),
)


class TritonBackend(InferenceBackend):
    name = "triton"
    #: ``_prepare`` sends one real window when the server answers (the server builds and warms that shape).
    warmed_by_prepare = True

    def _prepare(self) -> None:
        self._setup()
        link = self.link
        try:
            self._connect()
            started = time.perf_counter()
            self._remote(torch.zeros(self.input_shape, dtype=torch.float32))
            logger.info(
                "Triton server %s: model %s verified, window %s warm in %.1f s",
                link.url,
                self.served,
                "x".join(map(str, self.input_shape)),
                time.perf_counter() - started,
            )
        except RemoteInferenceError as exc:
            if exc.outcome is RemoteOutcome.REFUSED:
                raise  # a wrong token or certificate does not heal: tell IT now
            logger.warning(
                "Triton server %s not usable at start (%s): series %s until it is; the link keeps trying",
                link.url,
                exc,
                "are computed by the local fallback" if link.fallback else "fail with a clear status",
            )

    def _setup(self) -> None:
        """The link's settings and state; no connection yet."""
        link = self.options.remote
        if link is None:
            raise BackendUnavailableError(
                f"{self.name}: no server configured", attribute="triton.url", found="", expected="host:port"
            )
        try:
            import tritonclient.grpc  # noqa: F401, PLC0415 - optional dependency, imported when chosen
        except ImportError as exc:
            raise BackendUnavailableError(
                f"{self.name}: tritonclient is not installed (pip install 'sct-edge-agent[remote]')"
            ) from exc
        self.link: RemoteLink = link
        self.served = served_model_name(self.manifest.model_id, self.manifest.version)
        self.expected = ServedIdentity.of(self.manifest)
        #: The last identity bytes that passed the check (responses repeat them; parsing once is enough).
        self._verified: bytes = b""
        #: The server's own identity, as it last answered (its engine is shown in the agent's engine info).
        self.server_identity: ServedIdentity | None = None
        self._client: grpcclient.InferenceServerClient | None = None
        #: The window's regions while connected with ``shared_memory``.
        self._shared: SharedMemoryWindows | None = None
        self._headers: dict[str, str] = {}
        #: A local backend for windows the server fails (``RemoteLink.fallback``); set by the registry.
        self.fallback: InferenceBackend | None = None
        self._retry_at = 0.0
        self._retry_delay = 0.0
        nbytes = 4 * int(np.prod(self.input_shape))
        if nbytes > MAX_MESSAGE_BYTES:
            raise ValueError(
                f"slab window {'x'.join(map(str, self.input_shape))}: found {nbytes} bytes, expected at most "
                f"{MAX_MESSAGE_BYTES} (gRPC's message limit); configure a smaller engine.slab_depth"
            )

    # -- the link ------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        """A new channel, and the identity probe that must name the manifest's model before any window."""
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        link = self.link
        self._disconnect()
        token = link.token()
        self._headers = {GRPC_TOKEN_HEADER: token} if token else {}
        client = grpcclient.InferenceServerClient(
            link.url,
            ssl=link.tls,
            root_certificates=str(link.tls_ca_file) if link.tls_ca_file else None,
            private_key=str(link.tls_key_file) if link.tls_key_file else None,
            certificate_chain=str(link.tls_cert_file) if link.tls_cert_file else None,
        )
        probe = grpcclient.InferInput(PROBE_INPUT, [1, 1], "INT32")
        probe.set_data_from_numpy(np.zeros((1, 1), dtype=np.int32))
        try:
            answer = self._call(
                partial(
                    client.infer,
                    identity_model_name(self.served),
                    [probe],
                    headers=self._headers,
                    client_timeout=min(PROBE_TIMEOUT_S, link.timeout_s),
                )
            )
        except BaseException:
            client.close()
            raise
        self._check_identity(answer.as_numpy(IDENTITY_OUTPUT))
        if link.shared_memory:
            self._share_memory(client)
        self._client = client
        if link.observer is not None:
            link.observer.remote_connected(True)
        logger.info(
            "Triton server %s: connected, serves %s as the manifest says", link.url, self.manifest.label
        )

    def _share_memory(self, client: grpcclient.InferenceServerClient) -> None:
        """Regions for this window shape, registered with the server; a server elsewhere cannot map them."""
        shared = SharedMemoryWindows(self.input_shape, self.outputs)
        try:
            shared.register(client, self._headers, self._call)
        except RemoteInferenceError as exc:
            shared.unregister(client, self._headers)
            shared.close()
            client.close()
            outcome = exc.outcome if exc.outcome in RETRIED else RemoteOutcome.REFUSED
            raise RemoteInferenceError(
                f"{exc}; shared memory needs the server on this host and its shared-memory protocol open to this "
                "agent (triton.shared_memory = false otherwise)",
                outcome=outcome,
                server=self.link.url,
            ) from None
        except BaseException:
            shared.close()
            client.close()
            raise
        self._shared = shared

    def _disconnect(self) -> None:
        client, self._client = getattr(self, "_client", None), None
        shared, self._shared = getattr(self, "_shared", None), None
        if shared is not None:
            if client is not None:
                shared.unregister(client, self._headers)
            shared.close()
        if client is not None:
            client.close()
            if self.link.observer is not None:
                self.link.observer.remote_connected(False)

    def _call(self, call: Any) -> Any:
        """One gRPC call, timed, classified and told to the observer; failures as RemoteInferenceError."""
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        observer = self.link.observer
        started = time.perf_counter()
        try:
            result = call()
        except InferenceServerException as exc:
            seconds = time.perf_counter() - started
            outcome = classify(str(exc.status() or ""), str(exc.message() or exc))
            if observer is not None:
                observer.remote_call(outcome.value, seconds)
            raise RemoteInferenceError(
                f"Triton server {self.link.url}, model {self.served}: {outcome.value} after {seconds:.1f} s "
                f"({exc.status()}: {exc.message()})",
                outcome=outcome,
                server=self.link.url,
            ) from None
        if observer is not None:
            observer.remote_call(RemoteOutcome.OK.value, time.perf_counter() - started)
        return result

    def _check_identity(self, identity: Any) -> None:
        raw = bytes(identity.reshape(-1)[0]) if identity is not None and identity.size else b""
        if raw and raw == self._verified:
            return
        try:
            served = ServedIdentity.from_json(raw)
            served.check(self.expected, self.link.url)
        except ServedModelMismatchError:
            self._verified = b""
            if self.link.observer is not None:
                self.link.observer.remote_call(RemoteOutcome.MISMATCH.value, 0.0)
            raise
        self._verified = raw
        self.server_identity = served

    def _remote(self, window: torch.Tensor) -> torch.Tensor:
        """The window computed by the server, with the link's attempts, backoff and reconnects."""
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        link = self.link
        host = np.ascontiguousarray(window.detach().cpu().numpy(), dtype=np.float32)[None]
        started = time.monotonic()
        last: RemoteInferenceError | None = None
        for attempt in range(link.attempts):
            if attempt:
                time.sleep(link.backoff_s * 2 ** (attempt - 1))
            try:
                if self._client is None:
                    self._connect()
                client = self._client
                assert client is not None
                if self._shared is not None:
                    request, outputs = self._shared.request(host)
                else:
                    request, outputs = grpcclient.InferInput(WINDOW_INPUT, list(host.shape), "FP32"), None
                    request.set_data_from_numpy(host)
                result = self._call(
                    partial(
                        client.infer,
                        self.served,
                        [request],
                        outputs=outputs,
                        headers=self._headers,
                        client_timeout=link.timeout_s,
                    )
                )
            except RemoteInferenceError as exc:
                self._disconnect()
                if exc.outcome not in RETRIED:
                    raise
                last = exc
                continue
            try:
                self._check_identity(result.as_numpy(IDENTITY_OUTPUT))
            except ServedModelMismatchError:
                self._disconnect()  # a server swapped under the link: the next window reconnects and asks again
                raise
            described = result.get_output(OUTPUTS_OUTPUT)
            found = tuple(described.shape) if described is not None else None
            expected = (1, self.outputs, *self.input_shape[1:])
            if found != expected:
                raise RemoteInferenceError(
                    f"Triton server {link.url}: output shape found {found}, expected {expected}",
                    outcome=RemoteOutcome.ERROR,
                    server=link.url,
                )
            out = self._shared.result() if self._shared is not None else result.as_numpy(OUTPUTS_OUTPUT)
            return torch.from_numpy(np.array(out[0], dtype=np.float32, copy=True))
        assert last is not None
        raise RemoteInferenceError(
            f"{last} (after {link.attempts} attempt{'s' if link.attempts > 1 else ''} over "
            f"{time.monotonic() - started:.1f} s)",
            outcome=last.outcome,
            server=link.url,
        )

    # -- the backend ---------------------------------------------------------------------------------------

    def _run(self, window: torch.Tensor) -> torch.Tensor:
        local = self.fallback
        if local is not None and time.monotonic() < self._retry_at:
            return self._run_locally(local, window)
        try:
            out = self._remote(window)
        except (RemoteInferenceError, ServedModelMismatchError) as exc:
            if local is None:
                raise
            link = self.link
            self._retry_delay = min(max(2 * self._retry_delay, link.retry_s), link.max_retry_s)
            self._retry_at = time.monotonic() + self._retry_delay
            logger.warning(
                "Triton server %s failed a window (%s); computing on the local %s %s, the server is tried again "
                "in %.0f s",
                link.url,
                exc,
                local.name,
                local.precision.value,
                self._retry_delay,
            )
            return self._run_locally(local, window)
        if self._retry_delay:
            logger.info("Triton server %s is back; windows go to it again", self.link.url)
        self._retry_delay = 0.0
        return out

    def _run_locally(self, local: InferenceBackend, window: torch.Tensor) -> torch.Tensor:
        if self.link.observer is not None:
            self.link.observer.remote_fallback()
        with local.stream_context():
            out = local.run_outputs(window.to(local.device)).float().cpu()
        local.synchronize()
        return out.clone()  # the local backend may reuse its output buffer

    def close(self) -> None:
        if hasattr(self, "link"):
            self._disconnect()
        if getattr(self, "fallback", None) is not None:
            assert self.fallback is not None
            self.fallback.close()
            self.fallback = None

    @property
    def precision(self) -> Precision:
        """The server engine's precision once it has answered (what computes the sCT); the options' before."""
        served = getattr(self, "server_identity", None)
        if served is not None and served.precision:
            with contextlib.suppress(ValueError):  # a newer server's precision this agent has no name for
                return Precision(served.precision)
        return super().precision

    def _device(self) -> str:
        return f"triton://{self.options.remote.url}" if self.options.remote else "triton"

    def _details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "server": self.link.url,
            "served_model": self.served,
            "tls": self.link.tls,
            "shared_memory": self.link.shared_memory,
        }
        if self.server_identity is not None:
            details["engine"] = self.server_identity.engine
        if self.fallback is not None:
            details["fallback"] = f"{self.fallback.name} {self.fallback.precision.value}"
        return details


def probe_server(manifest: ModelManifest, link: RemoteLink) -> ServedIdentity:
    """Connect and check the server's identity against the manifest, computing nothing (``sct-agent doctor``).

    Raises :class:`RemoteInferenceError` (unreachable, refused) or :class:`ServedModelMismatchError`."""
    factor = manifest.architecture.downsampling_factor
    backend = TritonBackend(
        manifest, (manifest.architecture.in_channels, factor, factor, factor), BackendOptions(remote=link)
    )
    backend._setup()
    try:
        backend._connect()
        assert backend.server_identity is not None
        return backend.server_identity
    finally:
        backend._disconnect()
