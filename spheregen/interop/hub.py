"""`hf:` checkpoint paths and the cache of converted checkpoints.

A checkpoint argument (`--ckpt`, `--tokenizer`, `convert`'s input) may be
- a spheregen checkpoint directory or run directory: used as it is;
- a file in one of the authors' formats (SphereAR `*.pt`, Sphere Encoder `*.pth`): converted once into
  the cache and reused;
- `hf:OWNER/REPO[@REVISION]/PATH/IN/REPO`, e.g. `hf:guolinke/SphereAR/SphereAR_B.pt`: downloaded with
  `huggingface_hub.hf_hub_download` (its cache, `HF_HOME` / `HF_HUB_CACHE` and `HF_HUB_OFFLINE` honoured),
  then converted once as above.

Converted checkpoints live under `$SPHEREGEN_CACHE` (default `~/.cache/spheregen`) in
`converted/KIND/KEY`, KEY naming the source file's content (the Hub's blob hash, or path, size and mtime of
a local file). Each is written under a temporary name and renamed, so a killed conversion is redone.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from spheregen.checkpoint import CONFIG_FILE, cache_root, write_dir_atomically
from spheregen.errors import UserError

HUB_PREFIX = "hf:"
# file suffix -> (converter kind, module with `convert_for_cache(source, out_dir, sibling) -> Path`)
CONVERTERS = {".pt": ("sphere-ar", "spheregen.interop.sphere_ar"),
              ".pth": ("sphere-encoder", "spheregen.interop.sphere_encoder")}
SiblingFn = Callable[[str], "Path | None"]


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{rev}/{self.filename}"


def is_hub_path(text: str | os.PathLike) -> bool:
    return str(text).startswith(HUB_PREFIX)


def parse_hub_path(text: str) -> HubFile:
    """'hf:owner/repo[@rev]/path/file' -> HubFile; a malformed one is a UserError."""
    parts = text[len(HUB_PREFIX):].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise UserError(f"{text!r} is not a Hub file path; write hf:OWNER/REPO/FILE, "
                        "e.g. hf:guolinke/SphereAR/SphereAR_B.pt")
    name, _, revision = parts[1].partition("@")
    return HubFile(f"{parts[0]}/{name}", "/".join(parts[2:]), revision or None)


def download(hub: HubFile) -> Path:
    """The local path of a Hub file, fetched through huggingface_hub's cache (with its progress bar)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise UserError("hf: paths need huggingface_hub: pip install huggingface_hub") from None
    try:
        return Path(hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision))
    except LocalEntryNotFoundError:
        raise UserError(f"{hub} is not in the Hugging Face cache and the Hub cannot be reached (offline, or "
                        "HF_HUB_OFFLINE=1); download it where there is internet (`hf download "
                        f"{hub.repo_id} {hub.filename}`) and copy the cache (HF_HOME), or pass a local file") from None
    except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError) as e:
        raise UserError(f"{hub} was not found on the Hub ({type(e).__name__}); check the repo, file and revision")\
            from None
    except OSError as e:
        raise UserError(f"could not download {hub} ({str(e).splitlines()[0][:120]}); check the network "
                        "or set HF_HUB_OFFLINE=1 to use the cache") from None


def content_key(path: Path) -> str:
    """A short key for a source file: the Hub blob it links to, else its absolute path, size and mtime."""
    real = path.resolve()
    stat = real.stat()
    ident = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    if real.parent.name == "blobs":  # huggingface_hub's cache: snapshots/REV/FILE -> ../../blobs/HASH
        ident = real.name
    return f"{path.stem}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}"


def converter_for(filename: str) -> tuple[str, str]:
    """(kind, module) of the converter for an authors' file, from its suffix."""
    suffix = Path(filename).suffix
    if suffix not in CONVERTERS:
        known = ", ".join(f"{s} ({k})" for s, (k, _) in CONVERTERS.items())
        raise UserError(f"do not know how to convert {filename}: expected one of {known}")
    return CONVERTERS[suffix]


def convert_cached(source: Path, sibling: SiblingFn, label: str) -> Path:
    """Convert an authors' file once into the cache; return the spheregen directory to load."""
    kind, module_name = converter_for(source.name)
    final = cache_root() / "converted" / kind / content_key(source)
    marker = final / "converted_from.txt"
    module = importlib.import_module(module_name)
    if not marker.is_file() and int(os.environ.get("LOCAL_RANK", 0)) > 0:
        _wait_for(marker, label)  # under torchrun, local rank 0 converts and the others wait for it
    if not marker.is_file():
        print(f"converting {label} into {final} (once; later runs reuse it)", flush=True)
        write_dir_atomically(final, lambda tmp: _convert_into(module, source, tmp, sibling, label))
    return final / marker.read_text().split("\n")[1]


def _wait_for(marker: Path, label: str, timeout_s: float = 3600.0) -> None:
    start = time.monotonic()
    while not marker.is_file():
        if time.monotonic() - start > timeout_s:
            raise UserError(f"gave up waiting for local rank 0 to convert {label}; convert it first with "
                            "`spheregen convert` and pass the directory")
        time.sleep(1.0)


def _convert_into(module, source: Path, tmp: Path, sibling: SiblingFn, label: str) -> None:
    entry = module.convert_for_cache(source, tmp, sibling)
    (tmp / "converted_from.txt").write_text(f"{label}\n{Path(entry).relative_to(tmp).as_posix()}\n")


def _local_sibling(source: Path) -> SiblingFn:
    def sibling(rel: str) -> Path | None:
        p = (source.parent / rel).resolve()
        return p if p.is_file() else None

    return sibling


def _hub_sibling(hub: HubFile) -> SiblingFn:
    def sibling(rel: str) -> Path | None:
        name = posixpath.normpath(posixpath.join(posixpath.dirname(hub.filename), rel))
        try:
            return download(HubFile(hub.repo_id, name, hub.revision))
        except UserError:
            return None

    return sibling


def fetch(path: str | os.PathLike) -> tuple[Path, SiblingFn, str]:
    """(local file, sibling lookup, label) for a local path or an hf: path (downloaded)."""
    text = str(path)
    if is_hub_path(text):
        hub = parse_hub_path(text)
        return download(hub), _hub_sibling(hub), str(hub)
    local = Path(text)
    return local, _local_sibling(local), str(local)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The spheregen directory for a checkpoint argument: a directory as given, an authors' file (local or
    hf:) converted once into the cache."""
    text = str(path)
    if not is_hub_path(text) and (Path(text).is_dir() or Path(text).suffix not in CONVERTERS):
        return Path(text)
    source, sibling, label = fetch(text)
    if not source.is_file():
        raise UserError(f"checkpoint file {source} does not exist; check the path")
    if source.suffix not in CONVERTERS:  # an hf: path to a spheregen file: use its folder
        return source.parent if (source.parent / CONFIG_FILE).is_file() else source
    return convert_cached(source, sibling, label)
