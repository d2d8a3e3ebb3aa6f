"""The Hugging Face Hub: a hub id where a pipeline directory is expected, and pushing an exported one.

Downloads and uploads go through `huggingface_hub` (its cache, its login: `huggingface-cli login` or
HF_TOKEN). Without a network (or with HF_HUB_OFFLINE=1 and nothing cached) a hub id is one clear error."""

from __future__ import annotations

from pathlib import Path

from ..common.errors import UserError, describe
from ..common.hub import REPO_ID, is_repo_id, local_snapshot


def resolve_pretrained(source: str | Path, revision: str | None = None) -> Path:
    """A local pipeline directory as is; a hub id downloaded (or taken from the cache) to a local snapshot."""
    return local_snapshot(source, "a directory written by `tmot export`", revision)


def push_to_hub(directory: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` (a model repo) if needed and upload `directory` to it; returns the repo's URL."""
    from huggingface_hub import HfApi

    if not REPO_ID.match(repo_id):
        raise UserError(f"--push-to-hub {repo_id!r}: a hub id is ORG/NAME (or USER/NAME)")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                          commit_message="tmot export")
    except Exception as err:
        raise UserError(f"cannot push {directory} to {repo_id} ({describe(err)}); log in with "
                        "`huggingface-cli login` (or set HF_TOKEN) with write access, and check the network; the "
                        f"exported directory {directory} is complete and can be uploaded later") from None
    return str(url)


__all__ = ["is_repo_id", "push_to_hub", "resolve_pretrained"]
