"""Files of Hugging Face Hub repos through huggingface_hub's cache: timm's ``hf-hub:`` ids, each of
huggingface_hub's errors as a line of its own, and a damaged cached file named, removed and
fetched again.

A file already in the cache is used without asking the Hub: published files do not change, so a
second load makes no request. huggingface_hub keeps an interrupted download under a temporary name
and removes it, so the cache only ever holds complete files; a file that is complete but damaged
(a disk fault, an edit by hand) is found when it is read, and then removed and fetched again, or,
in a cache that cannot be changed, named with what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, TypeVar

from densenet_jax.errors import CheckpointError

log = logging.getLogger("densenet_jax")
T = TypeVar("T")
_ANSWERED: set[str] = set()  # Hub endpoints that answered in this process


class DamagedFile(CheckpointError):
    """A downloaded or cached file that is not what its name says (truncated, not JSON, ...)."""


class MissingFile(CheckpointError):
    """The repo exists but holds no such file (at that revision)."""


def split_repo(spec: str) -> tuple[str, str | None]:
    """timm's ``hf-hub:`` id (what follows the prefix): ``org/name``, or ``org/name@revision`` for a
    branch, tag or commit, as timm's ``hf_split`` reads it. CheckpointError for more than one ``@``
    or an empty repo or revision."""
    repo_id, at, revision = spec.partition("@")
    if not repo_id or (at and not revision) or "@" in revision:
        raise CheckpointError(f"hf-hub:{spec}: not a Hub repo id (org/name, or org/name@revision "
                              "for a branch, tag or commit)")
    return repo_id, revision or None


def fetch(repo_id: str, filename: str, name: str, read: Callable[[Path], T], revision: str | None = None) -> T:
    """``read(path)`` of ``filename`` from the Hub repo, downloaded when it is not cached.

    ``read`` raises DamagedFile for a file that is not usable: it is removed from the cache, and
    fetched again once when it came from the cache (with a warning naming it). Where the cache
    cannot be changed, CheckpointError names the file, the fault and what to do, rather than the
    file system's error on removing it."""
    path, cached = download(repo_id, filename, name, revision)
    try:
        return read(path)
    except DamagedFile as e:
        _evict(path, e)
        if not cached:
            raise DamagedFile(f"{name}: {e} (removed from the cache)") from None
        log.warning("warning: %s (in the Hugging Face cache): %s; removed, fetching it again", path, _fault(path, e))
    path, _ = download(repo_id, filename, name, revision)
    try:
        return read(path)
    except DamagedFile as e:
        _evict(path, e)
        raise DamagedFile(f"{name}: {e} (removed from the cache)") from None


def _evict(path: Path, fault: Exception) -> None:
    """Remove a cached file: huggingface_hub's snapshot entry and the blob it links to."""
    blob = path.resolve()
    try:
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path}: {_fault(path, fault)}; the Hugging Face cache cannot be changed here ({e.strerror}): "
                              f"delete {blob} and {path} where it can be, or set HF_HUB_CACHE to a writable "
                              "folder") from None


def _fault(path: Path, error: Exception) -> str:
    """What is wrong with the file, without its path, which the line names already."""
    return str(error).removeprefix(f"{path}: ")


def download(repo_id: str, filename: str, name: str, revision: str | None = None) -> tuple[Path, bool]:
    """The cached copy of ``filename`` from Hub repo ``repo_id`` at ``revision`` (default: main),
    downloaded first when needed, and whether it was in the cache already.

    Errors are CheckpointError naming ``name``, the repo and the file, one kind of line for each of
    huggingface_hub's errors: a gated repo, a repo that does not exist or is private (HF_TOKEN), a
    revision or a file (MissingFile) it does not have, an id it refuses, no connection or
    HF_HUB_OFFLINE (the file to fetch and how to pass it), and a download that failed."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True)), True
    except LocalEntryNotFoundError:
        pass
    except HFValidationError:
        raise CheckpointError(f"{name}: {repo_id!r} is not a Hub repo id (org/name, or org/name@revision)") from None
    try:
        if not _hub_answers():
            raise LocalEntryNotFoundError("the Hub cannot be reached")
        return Path(hf_hub_download(repo_id, filename, revision=revision)), False
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise CheckpointError(_offline(repo_id, filename, name, revision)) from None
    except GatedRepoError:
        from huggingface_hub import constants
        raise CheckpointError(f"{name}: Hub repo {repo_id} is gated: accept its conditions at "
                              f"{constants.ENDPOINT}/{repo_id} and set HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise CheckpointError(_not_found(repo_id, name)) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{name}: Hub repo {repo_id} has no revision {revision!r} "
                              "(a branch, tag or commit)") from None
    except EntryNotFoundError:
        at = f" at revision {revision}" if revision else ""
        raise MissingFile(f"{name}: Hub repo {repo_id} has no {filename}{at}") from None
    except (OSError, httpx2.HTTPError) as e:  # a connection cut mid-download (after huggingface_hub's
        # resumed retries), its size check, disk errors
        raise CheckpointError(f"{name}: downloading {filename} from {repo_id} failed "
                              f"({str(e).strip().splitlines()[0]}); nothing was kept, run again") from None


def _hub_answers() -> bool:
    """Whether the Hub's endpoint answers one request (True under HF_HUB_OFFLINE, which
    huggingface_hub refuses itself). huggingface_hub retries a request that cannot connect five
    times, warning each time; one try without retries tells the same at once. Any answer, even an
    error status, means the network is there. An endpoint that answered is not asked again."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE or constants.ENDPOINT in _ANSWERED:
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except httpx2.TransportError:  # no connection, a timeout, a network error
        return False
    _ANSWERED.add(constants.ENDPOINT)
    return True


def _not_found(repo_id: str, name: str) -> str:
    """The Hub answers a private repo as a missing one: the line says which the user can fix."""
    from huggingface_hub import get_token
    if get_token():
        return (f"{name}: no Hub repo {repo_id} that your token (HF_TOKEN, or hf auth login) can read: "
                "check the name, and that the token has read access to it")
    return (f"{name}: no Hub repo {repo_id} that can be read without a token: check the name; if the repo "
            "is private, set HF_TOKEN to a token with read access to it")


def _offline(repo_id: str, filename: str, name: str, revision: str | None) -> str:
    from huggingface_hub import constants, hf_hub_url
    why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
           "the Hub cannot be reached (HF_HUB_OFFLINE=1 says so at once, without trying)")
    return (f"{name}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
            f"fetch {hf_hub_url(repo_id, filename, revision=revision)} on a machine that can and pass "
            f"the file (create_model(..., pretrained_cfg_overlay=dict(file=PATH)), or --weights PATH "
            f"with --model), or copy that machine's cache there")
