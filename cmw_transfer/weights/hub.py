"""Hub I/O through huggingface_hub, with its failures said in one line, and in seconds.

huggingface_hub's own exceptions are mapped to :class:`~cmw_transfer.errors.UserError`; so are the transport
errors of the HTTP client it uses (no network), which it lets through unwrapped.

Without ``HF_HUB_OFFLINE``, huggingface_hub meets an unreachable Hub with a metadata request, then, when the file
is not cached, five retries with exponential back-off and a 60 s timeout each: ~25 s for a closed port, minutes
for a server that accepts and never answers. :func:`hub_unreachable` asks the endpoint once, with a
``PROBE_TIMEOUT_S`` timeout, before our downloads and uploads: when it does not answer, a download falls back to
the local cache at once (as HF_HUB_OFFLINE would) and an upload is refused.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from cmw_transfer.errors import UserError
from cmw_transfer.weights.spec import WeightsSpec

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"
PROBE_TIMEOUT_S = 2.0  # the Hub answers a HEAD in well under a second where there is network
ETAG_TIMEOUT_S = 3.0  # per metadata request of our downloads (huggingface_hub's default: 10 s)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's "could not talk to the server" errors (httpx2 for huggingface_hub 1.x/2.x, httpx before)."""
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def hub_unreachable() -> str | None:
    """Why the Hub endpoint (``HF_ENDPOINT``) cannot be reached, asked once per process with ``PROBE_TIMEOUT_S``;
    None when it answers (any HTTP status) or in offline mode, where nothing is asked."""
    if constants.HF_HUB_OFFLINE:
        return None
    return _probe(constants.ENDPOINT)


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str) -> str | None:
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except _transport_errors() as exc:
        return f"{exc.__class__.__name__}: {_first_line(exc)}"[:200]
    return None


@contextlib.contextmanager
def hub_errors_as_user_errors(spec: WeightsSpec, *, label: str | None = None, action: str = "load",
                              unreachable: str | None = None) -> Iterator[None]:
    """Turn the Hub's failures into one ``UserError`` line naming ``label`` (default: the spec); ``unreachable``:
    why the Hub was not asked (:func:`hub_unreachable`), said when the cache does not hold the files either."""
    name = label or str(spec)
    pushing = action != "load"
    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if pushing:
            raise UserError(f"cannot {action} hub:{spec.target}: offline (HF_HUB_OFFLINE is set); unset it where "
                            "there is network") from None
        why = f" (the Hub at {constants.ENDPOINT} did not answer within {PROBE_TIMEOUT_S:g} s: {unreachable})" \
            if unreachable else ""
        raise UserError(
            f"{name} is not in the local Hugging Face cache and the Hub cannot be reached{why}: download it where "
            f"there is network (hf download {spec.target}), point HF_HUB_CACHE at that cache, or pass a local "
            "directory"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{name}: revision '{spec.revision}' does not exist in {spec.target}") from None
    except GatedRepoError:
        raise UserError(f"{name}: the repository is gated; request access on the Hub, then {LOGIN_HINT}") from None
    except RepositoryNotFoundError:
        raise UserError(f"{name}: no such repository on the Hub (or it is private: {LOGIN_HINT})") from None
    except EntryNotFoundError:
        raise UserError(f"{name}: the repository has no model.safetensors; it was not pushed by cmw-transfer") \
            from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise UserError(f"cannot {action} {name}: the Hub refused the token (HTTP {status}); {LOGIN_HINT} with "
                            "a token that has write access") from None
        raise UserError(f"{name}: the Hub answered {exc.__class__.__name__}: {_first_line(exc)}") from None
    except _transport_errors() as exc:
        hint = "" if action == "push to" else " or set HF_HUB_OFFLINE=1 to use the cache"  # a push needs the Hub
        raise UserError(f"cannot {action} {name}: the Hub at {constants.ENDPOINT} cannot be reached "
                        f"({_first_line(exc)}); check the network{hint}") from None


def check_can_push(repo_id: str, token: str | bool | None = None) -> None:
    """Refuse before any upload: offline mode, no token at all (argument, HF_TOKEN, or `hf auth login`), or a Hub
    that does not answer."""
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot push to hub:{repo_id}: offline (HF_HUB_OFFLINE is set); unset it where there is "
                        "network")
    if token is False or not (token or _stored_token()):
        raise UserError(f"cannot push to hub:{repo_id}: no Hugging Face token; {LOGIN_HINT}")
    reason = hub_unreachable()
    if reason:
        raise UserError(f"cannot push to hub:{repo_id}: the Hub at {constants.ENDPOINT} cannot be reached (no answer "
                        f"within {PROBE_TIMEOUT_S:g} s: {reason}); check the network")


def _stored_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def push_directory(directory: Path, repo_id: str, files: Sequence[str], *, private: bool = False,
                   revision: str | None = None, commit_message: str = "Upload CMW-Net weighting net") -> str:
    """Upload exactly ``files`` of a saved net directory (nothing else that lies there); returns the commit URL."""
    from huggingface_hub import HfApi

    check_can_push(repo_id)
    spec = WeightsSpec("hub", repo_id, revision)
    api = HfApi()
    with hub_errors_as_user_errors(spec, action="push to"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, revision=revision,
                                 commit_message=commit_message, allow_patterns=list(files))
    return str(info)
