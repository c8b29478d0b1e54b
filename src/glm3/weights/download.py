"""Getting a ChatGLM3 checkpoint: from the HuggingFace Hub, or a synthetic stand-in for offline runs.

Hub downloads go through huggingface_hub (its cache makes them resumable and shared between runs; it
honours HF_ENDPOINT, HF_TOKEN, HF_HOME/HF_HUB_CACHE and HF_HUB_OFFLINE). On top of it we:
resolve the revision to a commit and download exactly that commit; fetch only what the model needs
(config, tokenizer, one weight format); check every weight file's sha256 against the Hub's LFS
metadata; and publish the files into the destination atomically, with a `source.json` recording the
repo, commit and checksums. With no network the first request fails within seconds and names the
offline alternative.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import time
from urllib.parse import urlparse

from glm3.io import atomic_directory, atomic_write_text, byte_progress, check_destination

DEFAULT_REPO = "THUDM/chatglm3-6b"
DEFAULT_REVISION = "main"
SOURCE_FILE = "source.json"
OFFLINE_HINT = (
    "offline alternative: `glm3 download --synthetic tiny --dst DIR` writes a random-weight checkpoint "
    "in the release's layout; files already in the HuggingFace cache are used with HF_HUB_OFFLINE=1"
)

_ALWAYS = ("config.json", "tokenizer.model", "tokenizer_config.json")
_WEIGHTS = {
    "safetensors": ("model*.safetensors", "model.safetensors.index.json"),
    "bin": ("pytorch_model*.bin", "pytorch_model.bin.index.json"),
}


class DownloadError(RuntimeError):
    """The hub could not be reached, the repo/revision does not exist, or a file failed verification."""


@dataclasses.dataclass
class DownloadSummary:
    dst: str
    repo_id: str
    revision: str
    commit: str
    files: dict[str, str]  # file name -> sha256 (LFS files) or "" (small git files)
    bytes: int
    seconds: float

    def describe(self) -> str:
        pinned = (
            ""
            if self.revision == self.commit
            else f" (revision {self.revision!r} is not pinned; pin it with --revision {self.commit})"
        )
        return (
            f"downloaded {self.repo_id}@{self.commit[:12]}{pinned}: {len(self.files)} files, "
            f"{self.bytes / 1e9:.3f} GB, sha256 verified, in {self.seconds:.1f} s -> {self.dst}"
        )


def select_files(names: list[str], prefer: str = "safetensors") -> list[str]:
    """The repo files a ChatGLM3 model directory needs: config, tokenizer, and one weight format."""
    if prefer not in _WEIGHTS:
        raise ValueError(f"prefer must be one of {sorted(_WEIGHTS)}, got {prefer!r}")
    chosen = [n for n in names if n in _ALWAYS]
    for fmt in (prefer, *[f for f in _WEIGHTS if f != prefer]):
        weights = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in _WEIGHTS[fmt]) and "/" not in n]
        if any(not n.endswith(".json") for n in weights):
            return sorted(chosen + weights)
    raise DownloadError("the repo has no model weights (model*.safetensors or pytorch_model*.bin)")


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def check_reachable(endpoint: str, timeout: float = 10.0) -> None:
    """Fail fast (a TCP connect with a timeout) instead of hanging when the endpoint is unreachable."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise DownloadError(f"cannot reach {endpoint} ({exc}). {OFFLINE_HINT}") from exc


def sha256_file(path: str, bar=None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def download_from_hub(
    dst: str | os.PathLike,
    repo_id: str = DEFAULT_REPO,
    revision: str = DEFAULT_REVISION,
    cache_dir: str | None = None,
    token: str | None = None,
    prefer: str = "safetensors",
    overwrite: bool = False,
    progress: bool = True,
    timeout: float = 10.0,
) -> DownloadSummary:
    """Download a ChatGLM3 checkpoint from the Hub into `dst` (complete and verified, or not at all)."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    dst = os.fspath(dst)
    check_destination(dst, 0, overwrite)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    start = time.perf_counter()
    if offline:
        snapshot = _snapshot(repo_id, revision, None, cache_dir, token, progress, local_files_only=True)
        wanted = select_files(sorted(os.listdir(snapshot)), prefer)
        commit = os.path.basename(os.path.normpath(snapshot))
        lfs_sha = {n: sha for n in wanted if (sha := _cached_blob_sha(snapshot, n))}
    else:
        endpoint = _endpoint()
        check_reachable(endpoint, timeout)
        api = HfApi(endpoint=endpoint, token=token)
        try:
            info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout)
        except hf_errors.RevisionNotFoundError as exc:
            raise DownloadError(f"revision {revision!r} not found in {repo_id}") from exc
        except hf_errors.GatedRepoError as exc:
            raise DownloadError(f"{repo_id} is gated: accept its license on the Hub and set HF_TOKEN") from exc
        except hf_errors.RepositoryNotFoundError as exc:
            raise DownloadError(f"repository {repo_id} not found at {endpoint} (or private: set HF_TOKEN)") from exc
        except Exception as exc:  # HTTP errors, and httpx transport errors (timeouts, resets)
            raise DownloadError(f"cannot query {repo_id} at {endpoint}: {exc}. {OFFLINE_HINT}") from exc
        commit = info.sha
        siblings = {s.rfilename: s for s in info.siblings or []}
        wanted = select_files(list(siblings), prefer)
        lfs_sha = {n: siblings[n].lfs.sha256 for n in wanted if siblings[n].lfs is not None}
        check_destination(dst, sum(siblings[n].size or 0 for n in wanted), overwrite)  # room for the download
        snapshot = _snapshot(repo_id, commit, wanted, cache_dir, token, progress, endpoint=endpoint)
    missing = [n for n in wanted if not os.path.isfile(os.path.join(snapshot, n))]
    if missing:
        raise DownloadError(f"download of {repo_id}@{commit} is incomplete: missing {', '.join(missing)}")
    sizes = {n: os.path.getsize(os.path.join(snapshot, n)) for n in wanted}
    checksums: dict[str, str] = {}
    with byte_progress(sum(sizes[n] for n in lfs_sha), "verify sha256", progress) as bar:
        for name, expected in lfs_sha.items():
            actual = sha256_file(os.path.join(snapshot, name), bar)
            if expected and actual != expected:
                _evict(os.path.join(snapshot, name))
                raise DownloadError(
                    f"{name} of {repo_id}@{commit} failed verification: sha256 {actual}, the Hub "
                    f"says {expected}. The corrupt copy was removed from the HuggingFace cache; "
                    "run the command again to download it anew"
                )
            checksums[name] = actual
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        for name in wanted:
            _link_or_copy(os.path.realpath(os.path.join(snapshot, name)), os.path.join(tmp, name))
        record = {
            "repo_id": repo_id,
            "revision": revision,
            "commit": commit,
            "files": {n: checksums.get(n, "") for n in wanted},
        }
        atomic_write_text(os.path.join(tmp, SOURCE_FILE), json.dumps(record, indent=2) + "\n")
    return DownloadSummary(
        dst=dst,
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        files={n: checksums.get(n, "") for n in wanted},
        bytes=sum(sizes.values()),
        seconds=time.perf_counter() - start,
    )


def _snapshot(
    repo_id: str,
    revision: str,
    allow: list[str] | None,
    cache_dir: str | None,
    token: str | None,
    progress: bool,
    **kwargs,
) -> str:
    """snapshot_download into the HF cache (resuming partial files); its errors become DownloadErrors."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        return snapshot_download(
            repo_id, revision=revision, allow_patterns=allow, cache_dir=cache_dir, token=token, max_workers=4, **kwargs
        )
    except hf_errors.LocalEntryNotFoundError as exc:
        raise DownloadError(
            f"{repo_id}@{revision} is not (completely) in the HuggingFace cache and the Hub "
            f"cannot be used: {exc}. {OFFLINE_HINT}"
        ) from exc
    except Exception as exc:  # HTTP errors, and httpx transport errors (connection reset, read timeout)
        raise DownloadError(
            f"download of {repo_id}@{revision} failed: {exc}. Run the same command again to "
            "resume (partial files stay in the HuggingFace cache)"
        ) from exc


def _cached_blob_sha(snapshot: str, name: str) -> str:
    """Offline: an LFS blob in the HF cache is named by its sha256; return it for weight files."""
    if name.endswith((".bin", ".safetensors")):
        blob = os.path.basename(os.path.realpath(os.path.join(snapshot, name)))
        if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
            return blob
    return ""


def _evict(snapshot_file: str) -> None:
    """Remove a cached file and the snapshot link to it, so the next attempt downloads it again."""
    blob = os.path.realpath(snapshot_file)
    for path in (snapshot_file, blob):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link the cached blob (no second copy on disk) or copy it when on another filesystem."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
