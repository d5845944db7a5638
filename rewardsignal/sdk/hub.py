"""Publishing a saved state to the Hugging Face Hub (``save_state(push_to_hub=True)``).

The push runs where the SDK runs: the export is downloaded from the coordinator
(sha256-checked) and committed with ``huggingface_hub``, so the Hub token
(``HF_TOKEN``, or ``huggingface-cli login``) stays on the user's machine and the
coordinator never holds it. ``huggingface_hub`` is the optional ``hub`` extra,
imported only when pushing; ``HF_ENDPOINT`` points it at another Hub.
"""

from __future__ import annotations

import re
from pathlib import Path

from rewardsignal.errors import SignalError, ValidationError

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise SignalError("push_to_hub needs huggingface_hub: pip install "
                          "'rewardsignal[hub]'") from None
    return huggingface_hub


def check_push(hub_model_id: str | None) -> str:
    """Everything a push needs, checked before anything is saved: the repo id
    and a token. Returns the token."""
    if not hub_model_id or not isinstance(hub_model_id, str):
        raise ValidationError("push_to_hub=True needs hub_model_id='user/name'")
    if not _REPO_ID.fullmatch(hub_model_id) or ".." in hub_model_id:
        raise ValidationError(f"hub_model_id {hub_model_id!r} is not a Hub repo id "
                              "('user/name': letters, digits, '.', '_', '-')")
    token = _hub().get_token()
    if not token:
        raise ValidationError("push_to_hub needs a Hugging Face token on this machine (the one "
                              "running the SDK): set HF_TOKEN or run `hf auth login`")
    return token


def push_folder(folder: Path, hub_model_id: str, *, token: str, private: bool | None,
                message: str) -> dict:
    """Create the repo if needed and commit every file of ``folder`` in one
    commit. Blocking: call through a thread."""
    hub = _hub()
    api = hub.HfApi(token=token)
    repo = api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model")
    operations = [hub.CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
                  for p in sorted(folder.iterdir()) if p.is_file()]
    commit = api.create_commit(repo.repo_id, operations, commit_message=message,
                               repo_type="model")
    return {"repo_id": repo.repo_id, "url": str(repo), "commit": commit.oid,
            "files": [op.path_in_repo for op in operations]}
