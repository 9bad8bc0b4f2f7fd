"""Stand-ins for real hub repositories, served by a stand-in hub client.

``docs/hub_repositories.yaml`` records each repository's real file names. :func:`build_standin` makes a folder with
exactly those names: weights of the tiny presets saved in each file's format (safetensors or pickle ``.bin``, fp16
for ``.fp16.`` variants), configs and tokenizer files from the tiny preset, and a placeholder for every other file
(a loader that reads one fails to parse it). :class:`StandinHub` replaces ``huggingface_hub.list_repo_files`` and
``huggingface_hub.snapshot_download``: the listing is the record's, and a download returns only the files its
``allow_patterns`` match (huggingface_hub's own matcher), so a loader that asks for a file the real repository
does not have gets nothing for it. ``served`` keeps what each repository handed out.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import REPO

RECORDS_FILE = REPO / "docs" / "hub_repositories.yaml"
PLACEHOLDER = b"stand-in: this file exists in the real repository, but no loader of this project reads it\n"


def records() -> list[dict]:
    return yaml.safe_load(RECORDS_FILE.read_text())


def record(repo: str) -> dict:
    found = [entry for entry in records() if entry["repo"] == repo]
    assert found, f"no record of {repo} in {RECORDS_FILE}"
    return found[0]


def _weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict saved in ``folder`` (a ``save_pretrained`` folder of the tiny preset)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors weights in {folder}"
    return load_file(files[0])


def _write_weights(state: dict[str, torch.Tensor], target: Path) -> None:
    if ".fp16." in target.name:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, target, metadata={"format": "pt"})
    else:
        torch.save(state, target)


def build_standin(files: list[str], source: Path, target: Path, weights: dict[str, Path]) -> Path:
    """A folder with exactly ``files``.

    Args:
        files: the recorded file names.
        source: a tiny model folder with the same relative layout (configs, tokenizer files are copied from it).
        target: the folder to write.
        weights: ``{subfolder: folder whose safetensors weights this subfolder's weight files carry}`` (``""``:
            the repository root).
    """
    for name in files:
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        folder, _, base = name.rpartition("/")
        is_weights = base.endswith((".safetensors", ".bin")) and folder in weights
        if (source / name).is_file() and not is_weights:
            shutil.copyfile(source / name, path)
        elif is_weights and base.split(".")[0] in ("diffusion_pytorch_model", "model", "pytorch_model"):
            _write_weights(_weights_of(weights[folder]), path)
        else:
            path.write_bytes(PLACEHOLDER)
    return target


@dataclass
class StandinHub:
    """A hub client over local stand-in folders (``repos``: ``{repo id: folder}``)."""

    root: Path
    repos: dict[str, Path] = field(default_factory=dict)
    served: dict[str, set[str]] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)  # repositories whose terms the user has not accepted
    # No network: every request fails as huggingface_hub 2.x's HTTP client fails when the hub's address refuses
    # connections (an httpx2.ConnectError, which is neither OSError nor ValueError; seen with HF_ENDPOINT pointing
    # at a closed port, after the client's retries).
    unreachable: bool = False
    listings: int = 0

    def add(self, repo_id: str, folder: Path) -> None:
        self.repos[repo_id] = folder

    def _files(self, repo_id: str) -> list[str]:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        if self.unreachable:
            request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}/tree/main")
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        if repo_id in self.gated:
            request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
            message = f"401 Client Error: Cannot access gated repo for url {request.url}"
            raise GatedRepoError(message, response=httpx2.Response(401, request=request))
        if repo_id not in self.repos:
            request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
            raise RepositoryNotFoundError(
                f"404 Client Error: Repository Not Found for url: {request.url}",
                response=httpx2.Response(404, request=request),
            )
        folder = self.repos[repo_id]
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def list_repo_files(self, repo_id: str, *, revision=None, repo_type=None, token=None) -> list[str]:
        self.listings += 1
        return self._files(repo_id)

    def snapshot_download(self, repo_id: str, *, allow_patterns=None, local_files_only=False, **kwargs) -> str:
        from huggingface_hub.utils import filter_repo_objects

        snapshot = self.root / "served" / repo_id.replace("/", "--")
        if local_files_only:
            from huggingface_hub.errors import LocalEntryNotFoundError

            if not snapshot.is_dir():
                raise LocalEntryNotFoundError(f"{repo_id} is not in the cache")
            return str(snapshot)
        chosen = list(filter_repo_objects(self._files(repo_id), allow_patterns=allow_patterns))
        for name in chosen:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.repos[repo_id] / name, snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        self.served.setdefault(repo_id, set()).update(chosen)
        return str(snapshot)

    def install(self, monkeypatch) -> StandinHub:
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        return self
