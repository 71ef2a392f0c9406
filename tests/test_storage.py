"""The object-store interface against local disk and a real SeaweedFS S3 server."""

from __future__ import annotations

import os
import stat
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


def test_s3_ranged_reader_seeks_and_fetches_only_what_is_read(s3_bucket):
    store = open_store(f"{s3_bucket}/ranged")
    data = os.urandom(3 << 20)
    store.put_bytes("blob.bin", data)
    with store.open_ranged("blob.bin", block_size=64 << 10) as f:
        assert f.read(10) == data[:10]
        f.seek(-100, os.SEEK_END)
        assert f.read() == data[-100:]
        assert f.read(5) == b""  # at the end
        f.seek(2 << 20)
        assert f.read(200_000) == data[2 << 20:(2 << 20) + 200_000]
        f.seek(5, os.SEEK_CUR)
        assert f.tell() == (2 << 20) + 200_005
        assert f.read(3) == data[(2 << 20) + 200_005:(2 << 20) + 200_008]
        assert f.raw.fetched < 600_000  # of 3 MiB
    with pytest.raises(ObjectNotFound):
        store.open_ranged("absent.bin")


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
    """A write half done (its first bytes written, the writer held until the reader has looked) is not there."""
    started, release = threading.Event(), threading.Event()
    outcome: list[str] = []

    def writer():
        with store.open_write("slow.bin") as f:
            f.write(b"x" * 100)
            started.set()
            # Held by the test, not by a clock; the bound only frees the thread of a test that failed meanwhile.
            outcome.append("released" if release.wait(300) else "never released")
            f.write(b"y" * 100)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert started.wait(300), "the writer never wrote its first bytes"
        assert not store.exists("slow.bin")
    finally:
        release.set()
        t.join(300)
    assert outcome == ["released"] and not t.is_alive()
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


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after (only masks at least as strict as 022 are used,
    so nothing else running meanwhile can create a file more open than usual)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_local_writes_get_the_mode_open_gives(tmp_path, umask, mask):
    umask(mask)
    store = open_store(tmp_path / "store")
    store.put_bytes("a/b/manifest.json", b"{}")
    with store.open_write("shard-000000.tar") as f:
        f.write(b"x" * 10)
    src = tmp_path / "src.bin"
    src.write_bytes(b"y")  # written by open(): the reference mode
    store.put_bytes("copy.bin", b"first")
    store.put_bytes("copy.bin", b"replaced")  # replacing an object gives it the same mode again
    expected = stat.S_IMODE(src.stat().st_mode)
    assert expected == 0o666 & ~mask
    for key in ["a/b/manifest.json", "shard-000000.tar", "copy.bin"]:
        assert oct(stat.S_IMODE(store.local_path(key).stat().st_mode)) == oct(expected), key
    assert oct(stat.S_IMODE((tmp_path / "store" / "a" / "b").stat().st_mode)) == oct(0o777 & ~mask)
    assert os.umask(mask) == mask  # writing never changes the process's umask
    assert [p.name for p in (tmp_path / "store").iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_local_temp_files_are_distinct_and_hidden(tmp_path):
    from dino_model.storage.local import create_temp_file

    fds = [create_temp_file(tmp_path, "x.bin") for _ in range(20)]
    assert len({path for _, path in fds}) == 20
    for fd, _ in fds:
        os.close(fd)
    assert all(os.path.basename(p).startswith(".tmp-x.bin.") for _, p in fds)
