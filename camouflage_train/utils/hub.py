"""Files from the Hugging Face hub: read a repository's file list, choose what a loader reads, fetch only that.

Real repositories differ in what they hold: ``lllyasviel/control_v11f1e_sd15_tile`` has only
``diffusion_pytorch_model.bin`` on its main branch, its siblings have ``.safetensors`` and ``.fp16`` variants,
``openmmlab/upernet-convnext-small`` has only ``pytorch_model.bin``. A loader that asks for a fixed file name
fails on some of them, and when it finds out only inside ``from_pretrained`` it has often downloaded gigabytes of
other files first. Here a loader states, for each file it needs, the names it can read in order of preference
(:class:`Want`: safetensors before pickle-free ``.bin`` loads); :func:`plan_files` reads the repository's file list
(one small request), picks the first name present for each, and raises :class:`HubLayoutError` naming the
repository, the missing file and what the repository has, before anything is downloaded. :meth:`HubPlan.fetch`
then downloads exactly the chosen files.

Offline (``HF_HUB_OFFLINE=1`` or no network) the choice is made from the local cache instead, and a file missing
there is one error with the ``hf download`` command that fetches it elsewhere. ``docs/hub_repositories.yaml``
records the real layouts of every repository the configs name; the tests load each through this module from a
stand-in with exactly those file names.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from camouflage_train.errors import UserError


class HubError(UserError, OSError):
    """A hub repository cannot be used: unreachable, gated, missing, or without a file the loader needs."""


def transport_errors() -> tuple[type[BaseException], ...]:
    """The connection errors of the ``httpx`` / ``httpx2`` clients that huggingface_hub 1.x/2.x use (they derive
    from neither ``OSError`` nor ``ValueError``)."""
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def network_errors() -> tuple[type[BaseException], ...]:
    """What the hub clients raise when the network or the hub cannot be reached: ``OSError`` and ``ValueError``
    (huggingface_hub 0.x, ``requests``, offline mode) and :func:`transport_errors`."""
    return (OSError, ValueError, *transport_errors())


class HubLayoutError(HubError):
    """The repository is reachable but holds none of the file names a loader can read for one of its files."""


@dataclass(frozen=True)
class Want:
    """One file a loader needs: the first of ``candidates`` (fnmatch patterns, in order of preference) present.

    Args:
        candidates: file names or patterns relative to the repository root, preferred first.
        required: a missing optional file (``False``) is skipped instead of being an error.
    """

    candidates: tuple[str, ...]
    required: bool = True


def weight_file(folder: str, stem: str, variant: str | None = None, bin_stem: str | None = None) -> Want:
    """The weights of one component: ``<folder>/<stem>[.<variant>].safetensors``, else the ``.bin`` file.

    Args:
        folder: the component's subfolder (``""`` for the repository root).
        stem: the file name without extension (``diffusion_pytorch_model`` for diffusers, ``model`` for
            transformers' safetensors).
        variant: a weight variant such as ``fp16`` (``None``: the plain file).
        bin_stem: the ``.bin`` file's stem where it differs (transformers: ``pytorch_model``).
    """
    prefix = f"{folder}/" if folder else ""
    suffix = f".{variant}" if variant else ""
    return Want((f"{prefix}{stem}{suffix}.safetensors", f"{prefix}{bin_stem or stem}{suffix}.bin"))


def choose_files(listing: Iterable[str], wants: Sequence[Want]) -> tuple[list[str], list[Want]]:
    """For each want, the first candidate present in ``listing``: ``(chosen file names, wants not satisfied)``.

    Args:
        listing: every file of the repository (or of the cached snapshot), relative to its root.
        wants: what the loader needs.
    """
    files = sorted(set(listing))
    chosen: list[str] = []
    missing: list[Want] = []
    for want in wants:
        for pattern in want.candidates:
            matches = fnmatch.filter(files, pattern)
            if matches:
                chosen += matches
                break
        else:
            if want.required:
                missing.append(want)
    return list(dict.fromkeys(chosen)), missing


@dataclass
class HubPlan:
    """What :func:`plan_files` chose in one repository; :meth:`fetch` downloads it.

    Args:
        repo_id: the repository.
        files: the chosen file names.
        revision: branch, tag or commit.
        repo_type: ``model`` or ``dataset``.
        cache_dir: the hub cache folder (``None``: ``HF_HOME``'s).
        local: the cached snapshot folder when the choice was made offline (nothing left to download).
        what: what the files are, for messages (``weights``, ``annotator files``, ...).
        config_key: the config key that names the repository, for errors.
    """

    repo_id: str
    files: list[str]
    revision: str | None = None
    repo_type: str = "model"
    cache_dir: str | None = None
    local: Path | None = field(default=None, repr=False)
    what: str = "files"
    config_key: str = ""

    def fetch(self) -> Path:
        """Download the chosen files (only those) and return the snapshot folder that holds them."""
        if self.local is not None:
            return self.local
        import huggingface_hub

        try:
            return Path(
                huggingface_hub.snapshot_download(
                    self.repo_id,
                    revision=self.revision,
                    repo_type=self.repo_type,
                    allow_patterns=self.files,
                    cache_dir=self.cache_dir,
                )
            )
        except network_errors() as err:
            raise HubError(
                f"{self.what} '{self.repo_id}': downloading {self.files} failed ({first_line(err)}); "
                f"{download_hint(self.repo_id, self.revision, self.repo_type, self.files, self.config_key)}"
            ) from err


def plan_files(
    repo_id: str,
    wants: Sequence[Want],
    *,
    revision: str | None = None,
    repo_type: str = "model",
    cache_dir: str | Path | None = None,
    what: str = "files",
    config_key: str = "",
    error: type[HubError] = HubError,
) -> HubPlan:
    """Choose the files of ``repo_id`` a loader reads, from the hub's file list (or the cache when offline).

    Nothing is downloaded here. Raises ``error`` (a :class:`HubError`) for an unreachable, gated or unknown
    repository, and :class:`HubLayoutError` when a required file is not there in any readable form.

    Args:
        repo_id: the repository id (``owner/name``).
        wants: the files the loader needs.
        revision: branch, tag or commit (``None``: the default branch).
        repo_type: ``model`` or ``dataset``.
        cache_dir: the hub cache folder (config ``cache_dir``); ``None`` uses ``HF_HOME``'s.
        what: what the files are, for messages (``ControlNet weights``).
        config_key: the config key that names the repository, for messages.
        error: the error class for an unavailable repository.
    """
    import huggingface_hub
    from huggingface_hub import errors

    cache = str(cache_dir) if cache_dir is not None else None
    every = [pattern for want in wants for pattern in want.candidates]
    preferred = [want.candidates[0] for want in wants]  # what a download should fetch: one file per want
    try:
        listing = huggingface_hub.list_repo_files(repo_id, revision=revision, repo_type=repo_type)
    except errors.GatedRepoError as err:
        raise error(
            f"{what} '{repo_id}' is gated: accept its terms at https://huggingface.co/{repo_id} and log in "
            f"(`hf auth login` or HF_TOKEN), or pass a local copy as {config_key or 'a folder'}"
        ) from err
    except errors.RevisionNotFoundError as err:
        raise error(f"{what} '{repo_id}' has no revision '{revision}' ({config_key or 'revision'})") from err
    except errors.RepositoryNotFoundError as err:
        raise error(
            f"{what} '{repo_id}' does not exist on the hub (or is private: log in with `hf auth login`); check "
            f"{config_key or 'the repository id'}"
        ) from err
    except network_errors() as err:  # offline, no network, hub down: use the cache if it has the files
        local = _cached_snapshot(repo_id, revision, repo_type, cache, every)
        hint = download_hint(repo_id, revision, repo_type, preferred, config_key)
        if local is None:
            raise error(
                f"Cannot load {what} '{repo_id}' (revision={revision}): it is not in the Hugging Face cache and "
                f"its file list could not be read ({first_line(err)}). {hint}"
            ) from err
        cached = [str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()]
        chosen, missing = choose_files(cached, wants)
        if missing:
            raise error(
                f"{what} '{repo_id}': the cached copy in '{local}' lacks {_describe(missing)} and the hub cannot "
                f"be reached ({first_line(err)}). {hint}"
            ) from err
        return HubPlan(repo_id, chosen, revision, repo_type, cache, local, what, config_key)
    chosen, missing = choose_files(listing, wants)
    if missing:
        raise HubLayoutError(
            f"{what} '{repo_id}' (revision={revision or 'default branch'}) has no {_describe(missing)}; the "
            f"repository holds {_holdings(listing)}. Pick another revision or "
            f"repository ({config_key or 'its config key'}), or convert the weights into a local folder and pass "
            "that folder instead"
        )
    return HubPlan(repo_id, chosen, revision, repo_type, cache, None, what, config_key)


def check_folder(
    folder: str | Path,
    wants: Sequence[Want],
    *,
    what: str = "files",
    config_key: str = "",
    error: type[HubError] = HubLayoutError,
) -> list[str]:
    """The files of a local model folder a loader reads (:func:`choose_files` over what it holds), checked before
    anything loads: a required file missing in every readable form raises ``error`` naming the folder, the file,
    what the folder holds and the config key.

    Args:
        folder: the folder (a ``save_pretrained`` folder or an ``hf download --local-dir`` copy).
        wants: the files the loader needs.
        what: what the files are, for messages (``person detector``).
        config_key: the config key that names the folder, for messages.
        error: the error class for a folder without a file it needs.
    """
    folder = Path(folder)
    listing = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    chosen, missing = choose_files(listing, wants)
    if missing:
        raise error(
            f"{what} folder '{folder}' has no {_describe(missing)}; it holds {_holdings(listing)}. Point "
            f"{config_key or 'its config key'} at a folder that has "
            "them (`save_pretrained` of the model and its processor, or `hf download <repo> --local-dir <folder>`) "
            "or at a hub id"
        )
    return chosen


def _cached_snapshot(
    repo_id: str, revision: str | None, repo_type: str, cache_dir: str | None, patterns: list[str]
) -> Path | None:
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id,
                revision=revision,
                repo_type=repo_type,
                allow_patterns=patterns,
                cache_dir=cache_dir,
                local_files_only=True,
            )
        )
    except network_errors():
        return None


def _holdings(listing: Sequence[str]) -> str:
    """The first 30 non-hidden files of a listing, for messages."""
    present = [name for name in listing if not name.startswith(".")]
    return f"{present[:30]}{' ...' if len(present) > 30 else ''}"


def _describe(missing: Sequence[Want]) -> str:
    return "; no ".join(" or ".join(want.candidates) for want in missing)


def download_hint(repo_id: str, revision: str | None, repo_type: str, patterns: Sequence[str], config_key: str) -> str:
    """The sentence that says how to fetch ``repo_id`` on a machine with internet and use it here.

    Args:
        repo_id: the repository.
        revision: branch, tag or commit (``None``: the default branch).
        repo_type: ``model`` or ``dataset``.
        patterns: the files to fetch (empty: all of them).
        config_key: the config key to point at the downloaded folder (empty: no key named).
    """
    include = " --include " + " ".join(f"'{pattern}'" for pattern in patterns) if patterns else ""
    kind = f" --repo-type {repo_type}" if repo_type != "model" else ""
    rev = f" --revision {revision}" if revision else ""
    use = f"pass {config_key}=<folder>" if config_key else "pass that folder"
    return (
        f"On a machine with internet run `hf download {repo_id}{kind}{rev}{include} --local-dir "
        f"<folder>`, then {use} (or point HF_HOME at a cache that has it)."
    )


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``, for one-line errors.

    Args:
        err: the exception.
    """
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
