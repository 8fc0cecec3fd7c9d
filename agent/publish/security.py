"""Decide, at start-up, whether the publisher runs CURVE, and load its keys; refuse unsafe configurations.

The sCT images are patient data on a shared operating-room network (docs/protocol.md §8). With
``publish.security = "auto"`` (the default) CURVE is on as soon as either endpoint is reachable from another
machine, and then the agent will not start without a private secret key and a non-empty allow-list. Plain TCP
off loopback happens only when a person wrote ``security = "plain"``; it is logged as a warning at every start
so that it shows up in the journal and in audits.
"""

from __future__ import annotations

import logging

from agent.ops.config import ConfigError, PublishConfig
from agent.publish.curve_keys import CurveServer, KeyFileError, curve_server, is_local_endpoint

logger = logging.getLogger(__name__)


def exposed_endpoints(config: PublishConfig) -> list[str]:
    """The publisher's endpoints that other machines can reach."""
    return [e for e in (config.endpoint, config.snapshot) if not is_local_endpoint(e)]


def publish_security(config: PublishConfig) -> CurveServer | None:
    """The CURVE settings the publisher must run with, or None for plain sockets.

    Raises :class:`~agent.ops.config.ConfigError` (the agent exits 78) when CURVE is required and a key is missing,
    unreadable, readable by others, or no subscriber is allowed in.
    """
    exposed = exposed_endpoints(config)
    if config.security == "plain":
        if exposed:
            logger.warning(
                "publish.security = plain: sCT images go UNENCRYPTED and UNAUTHENTICATED on %s, reachable from "
                "other machines; use this only on a dedicated, isolated network",
                ", ".join(exposed),
            )
        return None
    if config.security == "auto" and not exposed:
        return None
    why = (
        "publish.security = curve"
        if config.security == "curve"
        else f"{', '.join(exposed)} is reachable from other machines, so CURVE is on (publish.security = auto)"
    )
    if config.secret_key_file is None:
        raise ConfigError(
            "publish.secret_key_file",
            "",
            f"the publisher's .key_secret file ({why}; create it with `sct-agent keys server`)",
        )
    if config.allowed_keys_folder is None:
        raise ConfigError(
            "publish.allowed_keys_folder",
            "",
            f"a folder of subscribers' .key files ({why}; create them with `sct-agent keys client NAME`)",
        )
    try:
        server = curve_server(config.secret_key_file, config.allowed_keys_folder)
    except KeyFileError as error:
        key = (
            "publish.allowed_keys_folder"
            if config.allowed_keys_folder in (error.path, error.path.parent)
            else "publish.secret_key_file"
        )
        raise ConfigError(key, f"{error.path}: {error.found}", error.expected) from None
    logger.info(
        "publisher runs CURVE; %d subscriber key(s) allowed from %s",
        len(server.allowed),
        config.allowed_keys_folder,
    )
    return server
