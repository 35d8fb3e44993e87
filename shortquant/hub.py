"""The Hugging Face Hub's naming rule for repo ids, said once: ``resolve_source``, the source card
reader, the jobs file and ``publish`` all ask here.

>>> is_hub_id("nota-ai/st-vicuna-v1.3-5.5b-taylor"), is_hub_id("./model"), is_hub_id("a/b/c")
(True, False, False)
>>> check_repo_id("me/st-vicuna-GGUF")
'me/st-vicuna-GGUF'
"""

from __future__ import annotations

import re

from .errors import PublishError

HUB = "https://huggingface.co"
# user/name: letters, digits, '.', '_', '-', each part starting with a letter or digit (the hub's rule).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(text) -> bool:
    """True for ``user/name`` as the hub allows it (no ``..``, not ending in ``.git`` or ``.``)."""
    return (isinstance(text, str) and bool(_REPO_ID.match(text)) and ".." not in text
            and not text.endswith((".git", ".")))


def check_repo_id(repo: str) -> str:
    """``repo`` when it is a hub id, else PublishError."""
    if not is_hub_id(repo):
        raise PublishError(f"invalid repo id {repo!r}; expected user/name")
    return repo
