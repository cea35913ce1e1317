"""Model names and the store: normalisation as Ollama does it, and no way out of the store."""

import pytest

from backends.store import FileRef, InvalidName, Manifest, ModelName, ModelNotFound, ModelStore


@pytest.mark.parametrize("raw, display", [
    ("foo", "foo:latest"),
    ("foo:bar", "foo:bar"),
    ("library/foo:1b", "foo:1b"),
    ("me/foo", "me/foo:latest"),
    ("hf.co/org/repo:Q4_K_M", "hf.co/org/repo:Q4_K_M"),
    ("localhost:5000/ns/m:t", "localhost:5000/ns/m:t"),
    ("SmolLM2:135M", "SmolLM2:135M"),
])
def test_parse(raw, display):
    assert ModelName.parse(raw).display == display


@pytest.mark.parametrize("raw", [
    "", " ", "../etc/passwd", "a/../../b", "a/b/c/d", "foo:", ":tag", "foo:ba/r", "foo\\bar", "foo\x00",
    "/abs", "a" * 400, "foo:..", ".hidden", "-dash",
])
def test_invalid(raw):
    with pytest.raises(InvalidName):
        ModelName.parse(raw)


def _manifest(name: str) -> Manifest:
    return Manifest(name=name, files=[FileRef("model", "blobs/sha256-" + "0" * 64, "0" * 64, 10)])


def test_case_insensitive_lookup_and_listing(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_manifest("MyModel:Tag"))
    assert store.get("mymodel:tag").name == "MyModel:Tag"
    assert store.get("MYMODEL:TAG").name == "MyModel:Tag"
    assert [m.name for m in store.list()] == ["MyModel:Tag"]
    with pytest.raises(ModelNotFound):
        store.get("mymodel")  # :latest


def test_copy_delete(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_manifest("a"))
    store.copy("a", "b:2")
    assert {m.name for m in store.list()} == {"a:latest", "b:2"}
    store.delete("a")
    assert not store.exists("a")
    with pytest.raises(ModelNotFound):
        store.delete("a")
    assert not list((tmp_path / "manifests").rglob("a"))


def test_manifest_paths_stay_inside(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(InvalidName):
        store.resolve(FileRef("model", "../../etc/passwd"))
    assert store.resolve(FileRef("model", "blobs/x")).is_relative_to(store.root)


def test_blob_digest_checked(tmp_path):
    import hashlib

    store = ModelStore(tmp_path)
    data = b"hello"
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    store.write_blob(good, [data])
    assert store.has_blob(good)
    with pytest.raises(ValueError):
        store.write_blob("sha256:" + "1" * 64, [data])
    assert not store.has_blob("sha256:" + "1" * 64)
    assert not list((tmp_path / "blobs").glob(".partial-*"))
    for bad in ("sha256:../../x", "md5:abc", "sha256:" + "G" * 64):
        with pytest.raises(InvalidName):
            store.blob_path(bad)


@pytest.mark.parametrize("raw", ["foo\n", "foo:latest\n", "a\nb", "foo\r:1", "\x1b[31mred", "foo\tbar", "x\x7f",
                                 "x\x85y", "smollm2:135m\ninjected=1"])
def test_control_characters_refused(raw):
    # "$" in a regex also matches before a final newline: "foo:latest\n" used to pass
    with pytest.raises(InvalidName, match="control characters"):
        ModelName.parse(raw)


def _blob(store: ModelStore, data: bytes) -> FileRef:
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    path = store.write_blob("sha256:" + digest, [data])
    return FileRef("model", str(path.relative_to(store.root)), digest, len(data))


def _blobs(store: ModelStore) -> set[str]:
    return {p.name for p in (store.root / "blobs").iterdir()}


def test_files_nothing_uses_are_deleted_never_one_still_used(tmp_path):
    store = ModelStore(tmp_path)
    one, two, other = _blob(store, b"one"), _blob(store, b"two"), _blob(store, b"other")
    partial = store.root / "blobs" / ".partial-upload"
    partial.write_bytes(b"in progress")
    store.put(Manifest(name="a", files=[one]))
    store.copy("a", "b")  # b shares the blob
    store.delete("a")
    assert _blobs(store) >= {one.path[6:], two.path[6:]}  # still used by b; two is an upload waiting
    store.put(Manifest(name="b", files=[two]))  # b replaced: "one" is used by nothing now
    assert one.path[6:] not in _blobs(store)
    assert {two.path[6:], other.path[6:], ".partial-upload"} <= _blobs(store)
    store.delete("b")
    assert _blobs(store) == {other.path[6:], ".partial-upload"}  # never an upload not yet used
    # a bundled model's file lives outside the store and is never deleted
    bundled = tmp_path / "bundled.gguf"
    bundled.write_bytes(b"x")
    store.put(Manifest(name="c", files=[FileRef("model", str(bundled))]))
    store.delete("c")
    assert bundled.exists()


def test_nothing_deleted_when_a_manifest_is_unreadable(tmp_path):
    store = ModelStore(tmp_path)
    one = _blob(store, b"one")
    store.put(Manifest(name="a", files=[one]))
    store.put(Manifest(name="b", files=[one]))
    broken = store.root / "manifests" / "registry.ollama.ai" / "library" / "b" / "latest.json"
    broken.write_text("{not json")  # its files are unknown: b might use anything
    store.delete("a")
    assert one.path[6:] in _blobs(store)
    assert store.prune(grace=0) == 0


def test_startup_prune_spares_recent_uploads(tmp_path):
    import os
    import time

    store = ModelStore(tmp_path)
    used, old, fresh = _blob(store, b"used"), _blob(store, b"old"), _blob(store, b"fresh")
    store.put(Manifest(name="a", files=[used]))
    hour_ago = time.time() - 7200
    for ref in (used, old):
        os.utime(store.root / ref.path, (hour_ago, hour_ago))
    (store.root / "blobs" / ".partial-x").write_bytes(b"uploading")
    assert store.prune() == 1
    assert _blobs(store) == {used.path[6:], fresh.path[6:], ".partial-x"}
