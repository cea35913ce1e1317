"""The model store: a directory of manifests by ``name:tag`` and content-addressed blobs.

Layout (like Ollama's)::

    <root>/manifests/<host>/<namespace>/<model>/<tag>.json
    <root>/blobs/sha256-<hex>            GGUF files and other single files
    <root>/models/<hex>/...              directories (OpenVINO IR) written by ``kiln compile``

Names are validated before they touch the file system, and looked up
case-insensitively (manifest paths are lower-cased), so no name can reach a path
outside ``<root>``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("kiln.store")
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,79}$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?$")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: newlines forge log lines
PRUNE_GRACE = 3600.0  # seconds: an unreferenced blob younger than this may be about to be used


class InvalidName(ValueError):
    pass


class ModelNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' not found")
        self.name = name


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, raw: str) -> ModelName:
        """``[host/][namespace/]model[:tag]``; ``foo`` is ``foo:latest``."""
        if not isinstance(raw, str) or not raw.strip():
            raise InvalidName("model name is empty")
        if _CONTROL.search(raw):
            raise InvalidName(f"invalid model name {raw!r}: control characters are not allowed")
        s = raw.strip()
        if len(s) > 350 or any(c in s for c in "\\\0") or ".." in s:
            raise InvalidName(f"invalid model name {raw!r}")
        tag = DEFAULT_TAG
        slash = s.rfind("/")
        colon = s.rfind(":")
        if colon > slash:
            s, tag = s[:colon], s[colon + 1 :]
        parts = s.split("/")
        if len(parts) > 3:
            raise InvalidName(f"invalid model name {raw!r}")
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace, model = parts
        elif len(parts) == 2:
            namespace, model = parts
        else:
            (model,) = parts
        # fullmatch: with match, "$" also matches before a final newline
        if not (_HOST.fullmatch(host) and _PART.fullmatch(namespace) and _PART.fullmatch(model)
                and _TAG.fullmatch(tag)):
            raise InvalidName(f"invalid model name {raw!r}")
        return cls(host, namespace, model, tag)

    @property
    def display(self) -> str:
        """The short form Ollama lists: ``model:tag``, ``ns/model:tag`` or the full name."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def manifest_relpath(self) -> Path:
        return Path("manifests", self.host.lower().replace(":", "%3A"), self.namespace.lower(),
                    self.model.lower(), self.tag.lower() + ".json")


@dataclass
class FileRef:
    role: str  # "model" (a .gguf) or "ir" (an OpenVINO IR directory)
    path: str  # relative to the store root; absolute only for bundled files
    sha256: str = ""
    size: int = 0


@dataclass
class Manifest:
    name: str
    backend: str = "llamacpp"
    format: str = "gguf"
    files: list[FileRef] = field(default_factory=list)
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization: str = ""
    context_length: int = 2048
    embedding_length: int = 0
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # default options
    messages: list[dict[str, Any]] = field(default_factory=list)  # preset conversation
    license: str | None = None
    source: str = ""
    parent: str = ""
    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    model_info: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)  # generation policy overrides
    devices: list[str] = field(default_factory=list)  # OpenVINO device preference
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific (NPU lengths, ...)
    modified_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["files"] = [FileRef(**f) for f in d.get("files", [])]
        return cls(**d)

    @property
    def digest(self) -> str:
        body = json.dumps({k: v for k, v in self.to_json().items() if k != "modified_at"},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def modified(self) -> dt.datetime:
        try:
            return dt.datetime.fromisoformat(self.modified_at)
        except ValueError:
            return dt.datetime.now(dt.timezone.utc)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        (self.root / "manifests").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)

    # -- names and manifests -------------------------------------------------
    def _manifest_path(self, name: ModelName) -> Path:
        p = (self.root / name.manifest_relpath()).resolve()
        if not p.is_relative_to(self.root / "manifests"):
            raise InvalidName(f"invalid model name {name.display!r}")
        return p

    def get(self, raw: str) -> Manifest:
        name = ModelName.parse(raw)
        p = self._manifest_path(name)
        try:
            return Manifest.from_json(json.loads(p.read_text()))
        except FileNotFoundError:
            raise ModelNotFound(raw) from None

    def exists(self, raw: str) -> bool:
        try:
            return self._manifest_path(ModelName.parse(raw)).is_file()
        except InvalidName:
            return False

    def put(self, manifest: Manifest) -> Manifest:
        name = ModelName.parse(manifest.name)
        manifest.name = name.display
        manifest.modified_at = manifest.modified_at or now_rfc3339()
        p = self._manifest_path(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        old = self._read(p)
        _atomic_write(p, json.dumps(manifest.to_json(), indent=1).encode())
        if old is not None:  # replaced (create over an existing name): its files may be unused now
            self._release(old.files)
        return manifest

    @staticmethod
    def _read(p: Path) -> Manifest | None:
        try:
            return Manifest.from_json(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def list(self) -> list[Manifest]:
        out = []
        for p in sorted((self.root / "manifests").rglob("*.json")):
            try:
                out.append(Manifest.from_json(json.loads(p.read_text())))
            except (ValueError, TypeError, KeyError):
                continue  # a damaged manifest must not hide the others
        return sorted(out, key=lambda m: m.modified_at, reverse=True)

    def copy(self, source: str, destination: str) -> Manifest:
        m = self.get(source)
        m.name = ModelName.parse(destination).display
        m.modified_at = now_rfc3339()
        return self.put(m)

    def delete(self, raw: str) -> None:
        name = ModelName.parse(raw)
        p = self._manifest_path(name)
        old = self._read(p)
        try:
            p.unlink()
        except FileNotFoundError:
            raise ModelNotFound(raw) from None
        for parent in p.parents:  # tidy empty directories up to manifests/
            if parent == self.root / "manifests":
                break
            try:
                parent.rmdir()
            except OSError:
                break
        if old is not None:
            self._release(old.files)

    # -- blobs ------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        m = _DIGEST.match(digest or "")
        if not m:
            raise InvalidName(f"invalid digest {digest!r}")
        return self.root / "blobs" / f"sha256-{m.group(1)}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def write_blob(self, digest: str, chunks: Any) -> Path:
        """Stores bytes from an iterable under ``digest``; refuses a mismatch."""
        with self.blob_writer(digest) as w:
            for chunk in chunks:
                w.write(chunk)
        return w.path

    def blob_writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self.blob_path(digest), digest)

    def resolve(self, ref: FileRef) -> Path:
        """The file a manifest points at. Relative paths must stay inside the store."""
        p = Path(ref.path)
        if p.is_absolute():
            return p  # bundled models, written by kiln itself, never by a request
        full = (self.root / p).resolve()
        if not full.is_relative_to(self.root):
            raise InvalidName(f"manifest file {ref.path!r} is outside the model store")
        return full

    def _referenced(self) -> set[Path] | None:
        """Every file a manifest points at, resolved; None when a manifest cannot be
        read, since its files are then unknown and nothing is safe to delete."""
        used: set[Path] = set()
        for p in (self.root / "manifests").rglob("*.json"):
            m = self._read(p)
            if m is None:
                log.warning("cannot read the manifest %s; not deleting unreferenced files",
                            p.relative_to(self.root))
                return None
            for ref in m.files:
                try:
                    used.add(self.resolve(ref))
                except InvalidName:
                    continue
        return used

    def _release(self, refs: Iterable[FileRef]) -> None:  # (``list`` here is the method above)
        """Deletes the files of a deleted or replaced manifest that no manifest uses
        any more: only the store's own (blobs, IR directories), never a bundled file."""
        used = self._referenced()
        if used is None:
            return
        for ref in refs:
            try:
                path = self.resolve(ref)
            except InvalidName:
                continue
            if path in used:
                continue
            if path.parent == self.root / "blobs" and path.name.startswith("sha256-"):
                path.unlink(missing_ok=True)
                log.info("deleted the unused blob %s", path.name)
            elif path.parent == self.root / "models" and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                log.info("deleted the unused model directory %s", path.relative_to(self.root))

    def prune(self, grace: float = PRUNE_GRACE) -> int:
        """Deletes blobs no manifest refers to (run at startup, as Ollama does), but not
        those written in the last ``grace`` seconds: an upload (``/api/blobs``) comes
        before the ``/api/create`` that uses it. Uploads in progress are ``.partial-*``
        files, never touched. IR directories are left to ``_release``: ``kiln compile``
        writes one before its manifest. Returns the number deleted."""
        used = self._referenced()
        if used is None:
            return 0
        now, n = dt.datetime.now().timestamp(), 0
        for p in (self.root / "blobs").glob("sha256-*"):
            try:
                if p.resolve() in used or now - p.stat().st_mtime < grace:
                    continue
                p.unlink()
                n += 1
            except OSError:
                continue
        if n:
            log.info("deleted %d unused blob(s)", n)
        return n


class BlobWriter:
    """Writes a blob to a temporary file, and puts it in place only if its sha256
    matches the digest it was announced with."""

    def __init__(self, path: Path, digest: str) -> None:
        self.path = path
        self.expected = path.name.removeprefix("sha256-")
        self.hash = hashlib.sha256()
        fd, self.tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        self.file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.file.write(data)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.file.close()
        try:
            if exc_type is None:
                if self.hash.hexdigest() != self.expected:
                    raise ValueError(f"digest mismatch: got sha256:{self.hash.hexdigest()}")
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
