"""Fetching a model repository's files from the Hugging Face Hub, through its usual cache.

    files = fetch("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    files.config, files.weights, files.preprocessor  # paths inside the cache

`huggingface_hub` is imported only here and only when called. The cache and offline mode
follow huggingface_hub's environment variables (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE), read
at each call rather than when huggingface_hub was first imported, so a process may change them.
Every failure is one `HubError` line saying what to do.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from types import ModuleType

from tome_jax.checkpoint import CheckpointError

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
# Preferred first: safetensors loads without unpickling anything.
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TRUE = ("1", "ON", "YES", "TRUE")


class HubError(CheckpointError):
    """A repository that cannot be fetched: not cached while offline, unknown, gated."""


@dataclasses.dataclass(frozen=True)
class RepoFiles:
    """Local paths of one repository revision's files (inside the Hub cache)."""

    repo_id: str
    commit: str
    config: Path
    weights: Path
    preprocessor: Path | None


def split_name(name: str) -> tuple[str, str | None]:
    """"ORG/NAME[@REV]" (also timm's "hf-hub:ORG/NAME") -> (repo id, revision or None)."""
    text = re.sub(r"^(hf-hub:|hf://)", "", name.strip())
    repo_id, _, revision = text.partition("@")
    if not _REPO_ID.fullmatch(repo_id):
        raise HubError(f"{name!r} is not a Hugging Face Hub model name (expected ORG/NAME, e.g. "
                       "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k)")
    return repo_id, revision or None


def is_repo_name(text: str) -> bool:
    """True when text reads as a Hub name (ORG/NAME[@REV], hf-hub:ORG/NAME) and is not a path
    that exists, so a command can take either a file or a name."""
    if os.path.exists(text):
        return False
    try:
        split_name(text)
    except HubError:
        return False
    return True


def cache_dir() -> Path:
    """The Hub cache huggingface_hub uses: HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def is_offline() -> bool:
    """HF_HUB_OFFLINE set to 1 / ON / YES / TRUE."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _import_hub() -> ModuleType:
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("loading weights by Hub name needs huggingface_hub: "
                       "pip install huggingface_hub") from None
    return huggingface_hub


def _not_cached(repo_id: str, cache: Path, what: str, reason: str) -> HubError:
    return HubError(f"{repo_id}: {what} is not in the Hugging Face cache {cache} ({reason}); "
                    f"fetch it once with network access, e.g. `hf download {repo_id}`")


def fetch(name: str, *, revision: str | None = None, cache: str | os.PathLike | None = None
          ) -> RepoFiles:
    """config.json, the weights (model.safetensors, else pytorch_model.bin) and, if the repo
    has one, preprocessor_config.json, each downloaded into the cache unless already there.

    name: "ORG/NAME" (or "ORG/NAME@REV"); revision: a branch, tag or commit (default main).
    Offline (HF_HUB_OFFLINE): only the cache is read; a missing config or weights file is a
    HubError saying how to fetch it, a missing preprocessor config is taken as absent.
    """
    hub = _import_hub()
    from huggingface_hub import errors

    repo_id, rev = split_name(name)
    revision = revision or rev
    cache = Path(cache) if cache is not None else cache_dir()
    offline = is_offline()
    reason = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
    uncached: list[str] = []

    def get(filename: str) -> Path | None:
        """The cached path, or None when the repo (or the cache, if unreachable) lacks it."""
        try:
            return Path(hub.hf_hub_download(repo_id, filename, revision=revision,
                                            cache_dir=cache, local_files_only=offline))
        except errors.GatedRepoError:
            raise HubError(f"{repo_id} is gated: accept its terms on huggingface.co and log in "
                           "(`hf auth login`)") from None
        except errors.RepositoryNotFoundError:
            raise HubError(f"{repo_id}: no such model repository on the Hugging Face Hub "
                           "(or a private one: `hf auth login`)") from None
        except errors.RevisionNotFoundError:
            raise HubError(f"{repo_id} has no revision {revision!r}") from None
        except errors.LocalEntryNotFoundError:
            if filename == CONFIG:
                raise _not_cached(repo_id, cache, "the repository", reason) from None
            uncached.append(filename)
            return None
        except errors.EntryNotFoundError:  # the repository has no such file
            return None
        except errors.HfHubHTTPError as e:
            raise HubError(f"{repo_id}: fetching {filename} failed: "
                           f"{str(e).splitlines()[0]}") from None

    config = get(CONFIG)
    if config is None:
        raise HubError(f"{repo_id} has no {CONFIG}: not a timm or transformers model repository")
    weights = next((p for p in map(get, WEIGHTS) if p is not None), None)
    if weights is None:
        if uncached:
            raise _not_cached(repo_id, cache, f"neither {' nor '.join(WEIGHTS)}", reason)
        raise HubError(f"{repo_id} has neither {' nor '.join(WEIGHTS)} (sharded or other "
                       "weight files are not supported)")
    return RepoFiles(repo_id=repo_id, commit=config.parent.name, config=config,
                     weights=weights, preprocessor=get(PREPROCESSOR))
