"""Hugging Face Hub ids where a local directory is expected: telling them apart, and getting a snapshot.

Downloads go through `huggingface_hub` (its cache, its login: `huggingface-cli login` or HF_TOKEN). Without
a network (or with HF_HUB_OFFLINE=1 and nothing cached) a hub id is one clear error."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputNotFound, describe

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(source: str | Path) -> bool:
    """`ORG/NAME` that is not a path on this machine."""
    return isinstance(source, str) and bool(REPO_ID.match(source)) and not Path(source).exists()


def local_snapshot(source: str | Path, what: str, revision: str | None = None,
                   allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is; a hub id downloaded (or taken from the cache) to a local snapshot, only the
    files matching `allow_patterns` when given. `what` names the expected content in the error."""
    if not is_repo_id(source):
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        only = {"allow_patterns": allow_patterns} if allow_patterns else {}
        return Path(snapshot_download(repo_id=str(source), revision=revision, **only))
    except Exception as err:  # offline, unknown repo, private without a login
        raise InputNotFound(f"{source}: cannot get it from the Hugging Face Hub ({describe(err)}); check the id "
                            "and the network, log in (`huggingface-cli login`) for a private repo, or pass a local "
                            f"directory ({what})") from None


__all__ = ["REPO_ID", "is_repo_id", "local_snapshot"]
