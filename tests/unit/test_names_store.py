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
