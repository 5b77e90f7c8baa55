"""The per-node data cache (training/data_cache.py): decoded once, memory-mapped, reused by a
restart, rebuilt when the source changes, identical to the direct decode, one build for
several ranks, and a builder's error reaching every rank."""

import io
import json
import os
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from helpers import run_ranks
from PIL import Image

from pfgmpp_fast import cli
from pfgmpp_fast.training import data, data_cache
from pfgmpp_fast.training.data import load_dataset
from pfgmpp_fast.training.train import run_training


def _images(n=12, res=8, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, res, res, c), dtype=np.uint8)


def _write_zip(path, images, labels=None):
    with zipfile.ZipFile(path, "w") as zf:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img if img.shape[-1] == 3 else img[..., 0]).save(buf, format="png")
            zf.writestr(f"00000/img{i:08d}.png", buf.getvalue())
        if labels is not None:
            zf.writestr(
                "dataset.json",
                json.dumps({"labels": [[f"00000/img{i:08d}.png", int(l)] for i, l in enumerate(labels)]}),
            )


def _sources(tmp_path):
    """One source of each cached kind: {kind: (path, images NCHW, labels)}."""
    out = {}
    imgs, labels = _images(), np.arange(12) % 5
    _write_zip(tmp_path / "a.zip", imgs, labels)
    out["zip"] = (tmp_path / "a.zip", imgs.transpose(0, 3, 1, 2), labels)
    folder = tmp_path / "folder"
    for i, img in enumerate(_images(seed=1, c=1)):
        (folder / "x").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(folder / "x" / f"{i:03d}.png")
    out["folder"] = (folder, _images(seed=1, c=1).transpose(0, 3, 1, 2), None)
    np.save(tmp_path / "b.npy", _images(seed=2))
    out["npy"] = (tmp_path / "b.npy", _images(seed=2).transpose(0, 3, 1, 2), None)
    floats = _images(seed=3).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    np.savez(tmp_path / "c.npz", images=floats, labels=np.arange(12))
    out["npz-float"] = (tmp_path / "c.npz", floats, np.arange(12))
    return out


def _no_decode(*_):
    raise AssertionError("the source was decoded although its cache is valid")


def _cache_files(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(data_cache.CACHE_SUFFIX))


@pytest.mark.parametrize("kind", ["zip", "folder", "npy", "npz-float"])
def test_cache_equals_direct_decode_and_is_reused(tmp_path, monkeypatch, kind):
    path, expected, labels = _sources(tmp_path)[kind]
    cache_dir = tmp_path / "cache"
    direct = load_dataset(str(path), cache=False, use_labels=labels is not None)
    cached = load_dataset(str(path), cache_dir=str(cache_dir), use_labels=labels is not None)
    assert cached.images.dtype == direct.images.dtype and torch.equal(cached.images, direct.images)
    assert torch.equal(direct.images, torch.from_numpy(expected))
    if labels is not None:
        assert torch.equal(cached.labels, direct.labels) and torch.equal(
            cached.labels.argmax(1), torch.from_numpy(labels)
        )
    (name,) = _cache_files(cache_dir)
    assert name.startswith(os.path.basename(str(path)) + ".")
    st = os.stat(cache_dir / name)
    # a restart (a new process: nothing kept in memory) reads the cache and decodes nothing
    data._CACHE.clear()
    monkeypatch.setattr(data, "_decoder", _no_decode)
    again = load_dataset(str(path), cache_dir=str(cache_dir), use_labels=labels is not None)
    assert torch.equal(again.images, direct.images)
    assert os.stat(cache_dir / name).st_mtime_ns == st.st_mtime_ns and _cache_files(cache_dir) == [name]
    # every batch path gives the direct decode's values
    x1, _ = again.get_batch(torch.tensor([3, 0, 11]))
    x2, _ = direct.get_batch(torch.tensor([3, 0, 11]))
    assert torch.equal(x1, x2)


def _mapped_file(address: int):
    """The file mapped at ``address`` in this process (from /proc/self/maps), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_cache_is_memory_mapped_not_read(tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((64, 3, 32, 32), np.uint8))
    ds = load_dataset(str(tmp_path / "big.npy"), cache_dir=str(tmp_path / "c"))
    (name,) = _cache_files(tmp_path / "c")
    assert _mapped_file(ds.images.data_ptr()) == str(tmp_path / "c" / name)
    direct = load_dataset(str(tmp_path / "big.npy"), cache=False)
    assert _mapped_file(direct.images.data_ptr()) != str(tmp_path / "c" / name)


def test_default_cache_lives_next_to_the_data(tmp_path):
    _write_zip(tmp_path / "d.zip", _images())
    load_dataset(str(tmp_path / "d.zip"))
    assert len(_cache_files(tmp_path)) == 1


@pytest.mark.parametrize("change", ["touch", "same-size-and-mtime-zip", "same-size-and-mtime-npy"])
def test_cache_is_rebuilt_when_the_source_changes(tmp_path, monkeypatch, change):
    cache_dir = tmp_path / "cache"
    path = tmp_path / ("s.npy" if change.endswith("npy") else "s.zip")
    old, new = _images(seed=4), _images(seed=5)
    write = (
        (lambda images: np.save(path, images)) if path.suffix == ".npy" else (lambda images: _write_zip(path, images))
    )
    write(old)
    first = load_dataset(str(path), cache_dir=str(cache_dir)).images.clone()
    (old_name,) = _cache_files(cache_dir)
    data._CACHE.clear()
    st = os.stat(path)
    if change == "touch":
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        expected = first
    else:  # new content of the same size, the old modification time: only the digest differs
        write(new)
        assert os.stat(path).st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        expected = torch.from_numpy(new.transpose(0, 3, 1, 2))
    decoded = []
    real = data._decoder
    monkeypatch.setattr(data, "_decoder", lambda spec: decoded.append(spec) or real(spec))
    again = load_dataset(str(path), cache_dir=str(cache_dir))
    assert decoded == [str(path)] and torch.equal(again.images, expected)
    assert len(_cache_files(cache_dir)) == 1 and _cache_files(cache_dir) != [old_name]  # the stale one is gone


def test_a_damaged_cache_file_is_rebuilt_not_read(tmp_path):
    np.save(tmp_path / "e.npy", _images())
    cache_dir = tmp_path / "cache"
    good = load_dataset(str(tmp_path / "e.npy"), cache_dir=str(cache_dir)).images.clone()
    (name,) = _cache_files(cache_dir)
    with open(cache_dir / name, "r+b") as f:  # truncated by a full disk, say
        f.truncate(os.path.getsize(cache_dir / name) - 100)
    data._CACHE.clear()
    assert torch.equal(load_dataset(str(tmp_path / "e.npy"), cache_dir=str(cache_dir)).images, good)
    assert os.path.getsize(cache_dir / name) > 4096 + good.numel() - 1


def test_decode_errors_still_name_the_file(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for i, res in enumerate((8, 8, 16)):
        Image.fromarray(np.zeros((res, res, 3), np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match=r"2\.png is 16x16.*0\.png is 8x8"):
        load_dataset(str(folder), cache_dir=str(tmp_path / "c"))
    (folder / "2.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"corrupt or unreadable image .*2\.png"):
        load_dataset(str(folder), cache_dir=str(tmp_path / "c"))
    assert not _cache_files(tmp_path / "c")  # nothing half-written stays
    assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".tmp")]


# ----------------------------------------------------------------------------------------
# Several ranks


def _rank_loads(rank, spec, cache_dir, out_dir, starts=("first", "second")):
    """Load ``spec`` once per start; a start after the first forgets what this process holds
    (as a restarted rank would) and must find the cache the first start built."""
    real = data._decoder
    for start in starts:

        def counting(spec_, start=start):
            open(os.path.join(out_dir, f"decoded-{start}-{rank}"), "w").close()
            return real(spec_)

        data._decoder = counting
        data._CACHE.clear()
        try:
            ds = load_dataset(spec, cache_dir=cache_dir, use_labels=True)
            np.save(os.path.join(out_dir, f"images-{start}-{rank}.npy"), ds.images.numpy())
        except Exception as exc:  # noqa: BLE001 - the test reads what each rank saw
            with open(os.path.join(out_dir, f"error-{rank}"), "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
            return


def test_two_ranks_build_the_cache_once(tmp_path):
    """Two ranks start together: one decodes (the other waits on the lock, then maps its
    file); at the second start neither decodes."""
    images, labels = _images(40), np.arange(40) % 3
    _write_zip(tmp_path / "r.zip", images, labels)
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(_rank_loads, 2, tmp_path / "ranks", str(tmp_path / "r.zip"), str(tmp_path / "cache"), str(out))
    assert not [f for f in os.listdir(out) if f.startswith("error")]
    decoded = sorted(f for f in os.listdir(out) if f.startswith("decoded"))
    assert len(decoded) == 1 and decoded[0].startswith("decoded-first-"), decoded
    for name in ("first-0", "first-1", "second-0", "second-1"):
        assert np.array_equal(np.load(out / f"images-{name}.npy"), images.transpose(0, 3, 1, 2))
    assert len(_cache_files(tmp_path / "cache")) == 1


def _corrupt_zip(path):
    _write_zip(path, _images(4))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("00000/img00000009.png", b"not a png")


def test_a_builders_error_reaches_every_rank(tmp_path):
    _corrupt_zip(tmp_path / "r.zip")
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(
        _rank_loads, 2, tmp_path / "ranks", str(tmp_path / "r.zip"), str(tmp_path / "cache"), str(out), ("first",)
    )
    errors = [(out / f"error-{r}").read_text() for r in range(2)]
    assert all("img00000009.png" in e for e in errors) and any(e.startswith("ValueError") for e in errors), errors
    assert not _cache_files(tmp_path / "cache")


def test_a_waiting_process_raises_the_builders_error_without_decoding(tmp_path, monkeypatch):
    """A process that waited on the lock while the builder failed reports that failure (it
    does not decode the data set again)."""
    _corrupt_zip(tmp_path / "r.zip")
    spec, cache_dir = str(tmp_path / "r.zip"), str(tmp_path / "cache")
    key = data_cache._key(data_cache.source_fingerprint(spec))
    path = data_cache.cache_file(spec, key, cache_dir)
    os.makedirs(cache_dir)
    result = {}

    def waiter():
        try:
            data_cache.load_cached(spec, lambda: result.setdefault("decoded", True) and None, cache_dir)
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc

    with data_cache._build_lock(path) as waited:  # the "builder" holds the lock ...
        assert not waited
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()  # ... the other process waits for it
        with pytest.raises(ValueError, match="img00000009.png"):
            data_cache._build(path, spec, key, lambda: data._decoder(spec))
    thread.join(30)
    assert "decoded" not in result and isinstance(result["error"], RuntimeError)
    assert "another process" in str(result["error"]) and "img00000009.png" in str(result["error"])
    # the next start decodes again (a failure is not remembered beyond the processes that waited)
    with pytest.raises(ValueError, match="img00000009.png"):
        load_dataset(spec, cache_dir=cache_dir)


def test_train_cache_dir(tmp_path):
    """`train --cache-dir DIR` puts the decoded data set in DIR (loop.py's load goes through it)."""
    _write_zip(tmp_path / "t.zip", (_images(16, res=8, c=1)))
    run_training(
        run_dir=str(tmp_path / "run"),
        data=str(tmp_path / "t.zip"),
        cache_dir=str(tmp_path / "cache"),
        batch=8,
        duration_kimg=0.008,
        tick_kimg=0.008,
        snap_ticks=None,
        dump_ticks=None,
        augment=0,
        network=dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]),
        precision="fp32",
        compile=False,
        channels_last=False,
        progress=False,
        device="cpu",
    )
    assert len(_cache_files(tmp_path / "cache")) == 1 and not _cache_files(tmp_path)


def test_zip64_fingerprint_reads_the_central_directory(tmp_path):
    """A zip of more than 65 535 members (zip64 end records, like a 200k-image data set): the
    fingerprint reads its central directory directly and sees a same-size content change."""
    path = str(tmp_path / "many.zip")

    def write(last: bytes):
        with zipfile.ZipFile(path, "w") as zf:
            for i in range(0x10000):
                zf.writestr(f"{i:05x}", b"")
            zf.writestr("last", last)

    write(b"a")
    directory = data_cache._zip_central_directory(path)
    with zipfile.ZipFile(path) as zf:
        assert directory is not None and directory.count(b"PK\x01\x02") == len(zf.infolist())
    before = data_cache.source_fingerprint(path)
    st = os.stat(path)
    write(b"b")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = data_cache.source_fingerprint(path)
    assert (after["size"], after["mtime_ns"]) == (before["size"], before["mtime_ns"])
    assert after["digest"] != before["digest"]


def test_train_cli_checks_cache_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc = cli.main(
        [
            "train",
            "--data",
            "digits",
            "--outdir",
            str(tmp_path / "run"),
            "--cache-dir",
            str(tmp_path / "file"),
            "--dry-run",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--cache-dir" in err and "Traceback" not in err
    rc = cli.main(
        [
            "train",
            "--data",
            "digits",
            "--outdir",
            str(tmp_path / "run"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--dry-run",
        ]
    )
    assert rc == 0 and '"cache_dir"' in capsys.readouterr().out


@pytest.mark.parametrize("cache", [True, False])
def test_labels_that_are_not_classes_load_but_not_for_conditioning(tmp_path, cache):
    """Vector or float labels (EDM allows them) do not stop an unconditional run; --cond refuses them."""
    np.savez(tmp_path / "v.npz", images=_images(), labels=np.ones((12, 3), np.float32))
    assert load_dataset(str(tmp_path / "v.npz"), cache=cache, cache_dir=str(tmp_path / "c")).num_images == 12
    with pytest.raises(ValueError, match="non-negative integer classes"):
        load_dataset(str(tmp_path / "v.npz"), cache=cache, cache_dir=str(tmp_path / "c"), use_labels=True)
    np.savez(tmp_path / "w.npz", images=_images(), labels=np.arange(11))
    with pytest.raises(ValueError, match="11 labels for 12 images"):
        load_dataset(str(tmp_path / "w.npz"), cache=cache, cache_dir=str(tmp_path / "c"))
