"""Hub I/O through huggingface_hub, with its failures said in one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from cmw_transfer.errors import UserError
from cmw_transfer.weights.spec import WeightsSpec


@contextlib.contextmanager
def hub_errors_as_user_errors(spec: WeightsSpec) -> Iterator[None]:
    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise UserError(
            f"{spec} is not in the local Hugging Face cache and the Hub cannot be reached: download it where there "
            f"is network (huggingface-cli download {spec.target}), point HF_HUB_CACHE at that cache, or pass a "
            "local directory"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{spec}: revision '{spec.revision}' does not exist in {spec.target}") from None
    except RepositoryNotFoundError:
        raise UserError(f"{spec}: no such repository on the Hub (or it is private: log in with `hf auth login`)") \
            from None
    except EntryNotFoundError:
        raise UserError(f"{spec}: the repository has no model.safetensors; it was not pushed by cmw-transfer") \
            from None
    except HfHubHTTPError as exc:
        raise UserError(f"{spec}: the Hub answered {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None


def push_directory(directory: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                   commit_message: str = "Upload CMW-Net weighting net") -> str:
    """Upload a saved net directory; returns the commit URL."""
    spec = WeightsSpec("hub", repo_id, revision)
    api = HfApi()
    with hub_errors_as_user_errors(spec):
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, revision=revision,
                                 commit_message=commit_message, allow_patterns=["*.safetensors", "*.json", "*.md",
                                                                                 "*.png"])
    return str(info)
