"""Hub ids (``facebook/MobileLLM-125M``) through huggingface_hub."""

from __future__ import annotations

import re
from pathlib import Path

from phonekit.errors import HubError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
             "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "generation_config.json"]


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not Path(spec).exists()


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch config, weights and tokenizer (cached by huggingface_hub); a clear error when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=_PATTERNS)
    except GatedRepoError:
        raise HubError(f"{repo_id}: the repo is gated; accept its license on the hub and log in (hf auth login), or pass a local folder") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such model on the hub (or it is private); check the id, or pass a local folder") from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{repo_id}: the hub is unreachable and the model is not in the local cache; "
            "download it where there is network and pass the local folder instead (phonekit ... /path/to/folder)"
        ) from None
    except Exception as e:  # network stacks raise many types (httpx, OSError, ...)
        raise HubError(f"{repo_id}: cannot download from the hub ({e.__class__.__name__}); pass a local folder instead") from None
    return Path(path)
