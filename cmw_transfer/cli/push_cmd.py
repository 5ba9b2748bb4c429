"""``cmw-transfer push``: upload a validated net directory to the Hub (its artifact files, nothing else)."""

from __future__ import annotations

from pathlib import Path

import click

from cmw_transfer.errors import UserError


@click.command("push")
@click.option("--weights", "weights_dir", required=True, type=click.Path(path_type=Path),
              help="A directory written by save_pretrained / metatrain.")
@click.option("--repo", "repo_id", required=True, help="Target repository, org/name.")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", default=None, help="Branch to push to (default: main).")
def push_cmd(weights_dir: Path, repo_id: str, private: bool, revision: str | None) -> None:
    """Validate a saved net and upload model.safetensors, config.json, README.md and curves.png with
    huggingface_hub (run files such as run.json or metrics.jsonl stay local). Needs a token: `hf auth login`."""
    from cmw_transfer.artifact import CMWNet, fileformat
    from cmw_transfer.weights.hub import check_can_push, push_directory
    from cmw_transfer.weights.spec import REPO_ID_PATTERN, REVISION_PATTERN

    if not weights_dir.is_dir():
        raise UserError(f"--weights must be a directory written by save_pretrained, got {weights_dir}")
    if not REPO_ID_PATTERN.fullmatch(repo_id):
        raise UserError(f"--repo must look like org/name, got {repo_id!r}")
    if revision is not None and not REVISION_PATTERN.fullmatch(revision):
        raise UserError(f"--revision must be a branch name (letters, digits, . _ - /), got {revision!r}")
    CMWNet.from_pretrained(weights_dir)  # refuse to publish a broken artifact
    check_can_push(repo_id)  # offline / no token: said before any network call
    files = [name for name in fileformat.ARTIFACT_FILES if (weights_dir / name).is_file()]
    url = push_directory(weights_dir, repo_id, files, private=private, revision=revision)
    click.echo(f"pushed {', '.join(files)} from {weights_dir} to hub:{repo_id} ({url})")
