"""Weight files on the Hugging Face hub, named as the official README links them.

Accepted names (anything else is a local path and is returned unchanged):
- `hf://OWNER/REPO/FILE`, `hf://spaces/OWNER/REPO/FILE`, `hf://datasets/OWNER/REPO/FILE`
  (optionally `hf://OWNER/REPO@REVISION/FILE`);
- `https://huggingface.co/[spaces/|datasets/]OWNER/REPO/resolve/REVISION/FILE` and the same
  with `/blob/` (the page of the file, as a browser shows it).
Downloads go through huggingface_hub's `hf_hub_download`: its cache (`$HF_HOME`, default
~/.cache/huggingface), resumption of an interrupted download, its progress bar, `HF_ENDPOINT`
(a mirror) and `HF_HUB_OFFLINE=1` (the cache only). Every failure is one WeightsError line
naming the file's URL: not on the hub, offline and not cached, or unreachable.
"""
import re
from dataclasses import dataclass
from typing import Optional

from ..errors import WeightsError

REPO_TYPES = {"spaces": "space", "datasets": "dataset"}  # URL path segment -> huggingface_hub repo_type
_HF_URI = re.compile(r"^hf://(?:(?P<kind>spaces|datasets)/)?(?P<owner>[^/]+)/(?P<repo>[^/@]+)(?:@(?P<rev>[^/]+))?"
                     r"/(?P<file>.+)$")
_HF_LINK = re.compile(r"^https?://(?:www\.)?huggingface\.co/(?:(?P<kind>spaces|datasets)/)?(?P<owner>[^/]+)/"
                      r"(?P<repo>[^/]+)/(?:resolve|blob)/(?P<rev>[^/]+)/(?P<file>.+?)(?:\?.*)?$")


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository."""

    repo_id: str  # "OWNER/REPO"
    filename: str  # path inside the repository
    repo_type: str = "model"  # "model", "space" or "dataset"
    revision: str = "main"

    @property
    def url(self) -> str:
        """The file's download URL on the configured endpoint (HF_ENDPOINT, default huggingface.co)."""
        from huggingface_hub import constants

        kind = {v: k for k, v in REPO_TYPES.items()}.get(self.repo_type)
        prefix = f"{kind}/" if kind else ""
        return f"{constants.ENDPOINT}/{prefix}{self.repo_id}/resolve/{self.revision}/{self.filename}"


def parse_hub_name(name: str) -> Optional[HubFile]:
    """The HubFile of an `hf://` name or a huggingface.co link (see the module docstring), else None."""
    match = _HF_URI.match(name) or _HF_LINK.match(name)
    if not match:
        return None
    return HubFile(repo_id=f"{match['owner']}/{match['repo']}", filename=match["file"],
                   repo_type=REPO_TYPES.get(match["kind"] or "", "model"), revision=match["rev"] or "main")


def is_hub_name(name: str) -> bool:
    return parse_hub_name(name) is not None


def fetch_weights(name: str, setting: str = "MODEL.WEIGHTS") -> str:
    """Local path of weight file `name`: a hub file is downloaded (or taken from the cache), any
    other name is returned as it is. `setting` names the option in error messages."""
    hub_file = parse_hub_name(name)
    if hub_file is None:
        return name
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return hf_hub_download(hub_file.repo_id, hub_file.filename, repo_type=hub_file.repo_type,
                               revision=hub_file.revision, tqdm_class=_progress_bar_class())
    except LocalEntryNotFoundError:  # offline or unreachable, and not cached (before RemoteEntryNotFoundError's base)
        reason = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub cannot be reached"
        raise WeightsError(f"cannot download {hub_file.url}: {reason} and it is not in the cache "
                           f"{constants.HF_HUB_CACHE} (download it and set {setting} to its path)") from None
    except (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        raise WeightsError(f"weights file {hub_file.url} not found on the hub ({setting})") from None
    except Exception as e:  # network, disk or server errors: all end the same way
        raise WeightsError(f"cannot download {hub_file.url} ({type(e).__name__}): download it and set {setting} "
                           "to its path") from None


def _progress_bar_class():
    """huggingface_hub's progress bar, shown on stderr also when it is not a terminal (a log file,
    a batch job) unless HF_HUB_DISABLE_PROGRESS_BARS turns it off: a download of gigabytes shows
    its progress wherever the output goes."""
    from huggingface_hub.utils import tqdm

    class DownloadProgress(tqdm):
        def __init__(self, *args, **kwargs):
            if kwargs.get("disable") is None:  # tqdm's "only on a terminal"
                kwargs["disable"] = False
            super().__init__(*args, **kwargs)

    return DownloadProgress


# Config keys that name weight files and accept hub names.
WEIGHT_KEYS = ("MODEL.WEIGHTS", "MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "MODEL.SAM.WEIGHTS")


def fetch_config_weights(cfg) -> None:
    """Replace each hub name among `WEIGHT_KEYS` of `cfg` by its downloaded local path (in place;
    `cfg` not frozen)."""
    for key in WEIGHT_KEYS:
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        node[leaf] = fetch_weights(node[leaf], key)
