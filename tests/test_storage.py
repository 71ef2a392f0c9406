"""The object-store interface against local disk and a real SeaweedFS S3 server."""

from __future__ import annotations

import threading

import pytest

from dino_model.storage import ObjectNotFound, StorageError, open_object, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"{bucket}/some/prefix")


def test_round_trip_list_size_delete(store):
    store.put_bytes("a/one.bin", b"1" * 10)
    store.put_bytes("a/two.bin", b"22")
    store.put_bytes("b.txt", b"hello")
    assert store.get_bytes("a/one.bin") == b"1" * 10
    assert [(o.key, o.size) for o in store.list("a/")] == [("a/one.bin", 10), ("a/two.bin", 2)]
    assert [o.key for o in store.list()] == ["a/one.bin", "a/two.bin", "b.txt"]
    assert store.size("b.txt") == 5 and store.exists("b.txt") and not store.exists("nope")
    store.delete("b.txt")
    store.delete("b.txt")  # deleting an absent object is fine
    assert not store.exists("b.txt")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("b.txt")
    with pytest.raises(ObjectNotFound):
        store.size("b.txt")


def test_streaming_read_and_large_write(store):
    data = bytes(range(256)) * (70 * 1024 * 4)  # ~70 MiB: crosses the S3 multipart threshold
    store.put_bytes("big.bin", data)
    assert store.size("big.bin") == len(data)
    f = store.open_read("big.bin")
    head = f.read(1000)
    rest = f.read()
    f.close()
    assert head + rest == data


def test_failed_write_leaves_nothing(store):
    store.put_bytes("keep.bin", b"old")
    with pytest.raises(RuntimeError):
        with store.open_write("keep.bin") as f:
            f.write(b"new-but-incomplete")
            raise RuntimeError("writer died")
    with pytest.raises(RuntimeError):
        with store.open_write("fresh.bin") as f:
            f.write(b"partial")
            raise RuntimeError("writer died")
    assert store.get_bytes("keep.bin") == b"old"
    assert not store.exists("fresh.bin")
    assert [o.key for o in store.list()] == ["keep.bin"]


def test_write_is_invisible_until_complete(store):
    started, release = threading.Event(), threading.Event()

    def writer():
        with store.open_write("slow.bin") as f:
            f.write(b"x" * 100)
            started.set()
            release.wait(10)
            f.write(b"y" * 100)

    t = threading.Thread(target=writer)
    t.start()
    started.wait(10)
    assert not store.exists("slow.bin")
    release.set()
    t.join()
    assert store.size("slow.bin") == 200


def test_keys_cannot_escape_the_root(store):
    for bad in ["../x", "a/../../x", "/abs", ""]:
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"no")


def test_check_writable(store):
    store.check_writable()
    assert not store.exists(".write-probe")


def test_bad_uris():
    for bad in ["gs://bucket/x", "s3://", "s3:///prefix", "file://host/path"]:
        with pytest.raises(ValueError):
            open_store(bad)


def test_open_object(tmp_path):
    store, key = open_object("s3://bucket/ckpt/last.pt")
    assert store.uri == "s3://bucket/ckpt" and key == "last.pt"
    store, key = open_object(str(tmp_path / "x" / "y.bin"))
    assert key == "y.bin" and store.uri.endswith("/x")


def test_s3_errors_are_clear_and_secret_free(s3_env, monkeypatch):
    secret = s3_env.secret_key
    with pytest.raises(StorageError, match="bucket does not exist"):
        list(open_store("s3://no-such-bucket-xyz/p").list())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret + "wrong")
    with pytest.raises(StorageError) as info:
        open_store("s3://no-such-bucket-xyz/p").check_writable()
    assert "denied" in str(info.value) and secret not in str(info.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="cannot reach"):
        open_store("s3://b/p").size("k")
