"""Hugging Face Hub ids: telling them from paths, and a clear error before a download that cannot work.

The loading code stays real (it is what Colab uses); offline, a hub id that is neither cached nor
reachable is refused in seconds instead of after transformers' retries.
"""

from __future__ import annotations

import re
from pathlib import Path

from workbench.core.errors import WorkbenchError
from workbench.sources import remote_code
from workbench.sources.source import ModelSource

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
"""A Hugging Face repo id: `name` or `owner/name`, letters, digits, `-`, `_`, `.`."""


def looks_like_path(name: str) -> bool:
    """A name that is meant as a local path, never a hub id: `./x`, `/x`, `~x`, `x\\y`, `a/b/c`,
    `x/y` where `x` exists here, or anything a hub id cannot be."""
    first = name.split("/", 1)[0]
    return (
        Path(name).expanduser().exists()
        or name.startswith((".", "/", "~"))
        or not HUB_ID.match(name)
        or ("/" in name and Path(first).exists())
    )


HUB_PROBE_TIMEOUT_S = 5.0


def check_hub_reachable(hub_id: str) -> None:
    """Fail in seconds, not after half a minute of retries, when the Hub cannot be reached.
    Offline mode (HF_HUB_OFFLINE=1) is left to the loaders: they read the local cache only."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return
    reason = _unreachable(constants.ENDPOINT)
    if reason is None:
        return
    if _in_hub_cache(hub_id):
        what = "It is in your local Hugging Face cache: set HF_HUB_OFFLINE=1 to use that copy without the network."
    else:
        what = "It is not in your local cache either. Check your network (or HF_ENDPOINT), or use a model folder, a .gguf file or 'bundled'."
    raise WorkbenchError(
        f"model {hub_id!r}: the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({reason}). {what}"
    )


def _unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to the endpoint (or the HTTPS proxy in the environment) fails, or None."""
    import socket
    import threading
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(endpoint)
    target = url
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{address[0]}: {exc.strerror or exc}")

    probe = threading.Thread(target=connect, daemon=True)  # name lookup has no timeout of its own
    probe.start()
    probe.join(HUB_PROBE_TIMEOUT_S + 1)
    return outcome[0] if outcome else f"{address[0]}: no answer within {HUB_PROBE_TIMEOUT_S:g} s"


def _in_hub_cache(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def local_folder(source: ModelSource) -> Path:
    """Where the source's files are on this machine: its folder, or the hub cache's folder of
    that repository (whose snapshot links point into its `blobs`)."""
    if source.is_local:
        return Path(source.location)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + source.location.replace("/", "--"))


def hub_source(hub_id: str, token: str | None, trust_remote_code: bool = False) -> ModelSource:
    """Check that a hub id resolves (config only, no weights) before any work starts."""
    from transformers import AutoConfig

    check_hub_reachable(hub_id)
    source = ModelSource(hub_id, hub_id, token=token, trust_remote_code=trust_remote_code)
    try:
        remote_code.check(source)
        AutoConfig.from_pretrained(hub_id, token=token, trust_remote_code=trust_remote_code)
    except WorkbenchError:
        raise
    except Exception as exc:  # hub errors come in many types; the message is what matters
        reason = str(exc).splitlines()[0][:300]
        if token:
            reason = reason.replace(token, "***")
        raise WorkbenchError(
            f"model {hub_id!r}: could not read its config from the Hugging Face Hub ({type(exc).__name__}: {reason}). "
            "Check the spelling, your network, and for gated models a token with access. Offline, use 'bundled'."
        ) from None
    return source
