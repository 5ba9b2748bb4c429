"""Hub I/O through huggingface_hub, with its failures said in one line.

huggingface_hub's own exceptions are mapped to :class:`~cmw_transfer.errors.UserError`; so are the transport
errors of the HTTP client it uses (no network), which it lets through unwrapped.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def hub_errors_as_user_errors(spec: WeightsSpec, *, label: str | None = None, action: str = "load") -> Iterator[None]:
    """Turn the Hub's failures into one ``UserError`` line naming ``label`` (default: the spec)."""
    name = label or str(spec)
    pushing = action != "load"
    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if pushing:
            raise UserError(f"cannot {action} hub:{spec.target}: offline (HF_HUB_OFFLINE is set); unset it where "
                            "there is network") from None
        raise UserError(
            f"{name} is not in the local Hugging Face cache and the Hub cannot be reached: download it where there "
            f"is network (hf download {spec.target}), point HF_HUB_CACHE at that cache, or pass a local directory"
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
    """Refuse before any network call: offline mode, or no token at all (argument, HF_TOKEN, or `hf auth login`)."""
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot push to hub:{repo_id}: offline (HF_HUB_OFFLINE is set); unset it where there is "
                        "network")
    if token is False or not (token or _stored_token()):
        raise UserError(f"cannot push to hub:{repo_id}: no Hugging Face token; {LOGIN_HINT}")


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
