"""Data faults: odd and broken images, shards that vanish or break, indexes that lie.

Each fault must give a clear message and lose nothing: odd images become RGB, broken
ones are skipped and counted (training, shard writing) or stop with an error naming them
(evaluation); shard sets that cannot work fail before training, never hang.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalejepa.config import MaskConfig
from scalejepa.data import make_shards
from scalejepa.data.cache import resolve_shards
from scalejepa.data.pipeline import LoaderState, ShardDataError, ShardStreams, TrainLoader
from scalejepa.data.shard_index import ShardIndexError, load_index
from scalejepa.data.transforms import decode_center_crop
from scalejepa.data.writer import build_shards
from scalejepa.eval.features import EvalDataError, load_images
from scalejepa.masks import MaskGenerator

pytestmark = pytest.mark.faults

SIZE = 32  # model input side in these tests
RED, BLUE = (255, 0, 0), (0, 0, 255)


# ----------------------------------------------------------------------------- odd images


def _bytes(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(mode: str = "RGB", size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _sideways() -> tuple[bytes, Image.Image]:
    """A JPEG stored 40x20 (red top, blue bottom) whose EXIF says: rotate 90 degrees
    clockwise. Upright it is 20x40, blue on the left, red on the right."""
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (0, 10, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = Image.new("RGB", (20, 40), RED)
    upright.paste(BLUE, (0, 0, 10, 40))
    return _bytes(im, "JPEG", exif=exif, quality=95), upright


def _bomb() -> bytes:
    """A 70-byte PNG that declares 30000 x 30000 pixels (Pillow refuses > 2 x MAX_IMAGE_PIXELS)."""
    data = bytearray(_bytes(Image.new("L", (1, 1)), "PNG"))
    ihdr = b"IHDR" + struct.pack(">II", 30000, 30000) + bytes(data[24:29])
    data[12:29], data[29:33] = ihdr, struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def _rgba() -> Image.Image:
    im = _photo("RGBA")
    im.putalpha(0)  # fully transparent: composited onto white
    return im


@pytest.fixture(scope="module")
def odd() -> dict[str, tuple[str, bytes]]:
    """name -> (file extension, file bytes); the first two cannot be decoded."""
    exif_jpeg, _ = _sideways()
    good = _bytes(_photo(), "JPEG", quality=90)
    return {
        "truncated": ("jpg", good[: len(good) // 2]),
        "bomb": ("png", _bomb()),
        "gray": ("jpg", _bytes(_photo("L"), "JPEG")),
        "cmyk": ("jpg", _bytes(_photo("CMYK"), "JPEG")),
        "rgba": ("png", _bytes(_rgba(), "PNG")),
        "palette": ("png", _bytes(_photo().quantize(16), "PNG")),
        "png16": ("png", _bytes(Image.fromarray(np.full((24, 24), 40000, np.uint16)), "PNG")),
        "tiny_png": ("png", _bytes(Image.new("RGB", (1, 1), RED), "PNG")),
        "tiny_jpg": ("jpg", _bytes(Image.new("RGB", (1, 1), RED), "JPEG")),
        "exif_rotated": ("jpg", exif_jpeg),
        "rgb": ("jpg", good),
    }


BROKEN = ("truncated", "bomb")


def _write_tar(path: Path, samples: list[tuple[str, str, bytes, int]]) -> Path:
    """A WebDataset tar of (key, image extension, image bytes, label) samples."""
    with tarfile.open(path, "w") as tar:
        for key, ext, data, label in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="module")
def odd_shard(odd: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The odd images as they are (not through the writer), one sample each, in order."""
    samples = [(name, ext, data, i) for i, (name, (ext, data)) in enumerate(odd.items())]
    return _write_tar(tmp_path_factory.mktemp("odd") / "odd-000000.tar", samples)


def _streams(urls: list, **kw: object) -> ShardStreams:
    options = dict(batch_size=4, image_size=SIZE, crop_scale=(1.0, 1.0),
                   mask_generator=MaskGenerator(SIZE // 4, MaskConfig(min_keep=4)), seed=0, rank=0,
                   num_streams=1, shuffle_buffer=1)
    return ShardStreams([str(u) for u in urls], **{**options, **kw})


def _halves(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the left and right quarter of an HWC image."""
    w = image.shape[1]
    return image[:, : w // 4].reshape(-1, 3).mean(0), image[:, -w // 4:].reshape(-1, 3).mean(0)


def _is_blue_left_red_right(image: np.ndarray) -> bool:
    left, right = _halves(image)
    return left[2] > 200 > left[0] and right[0] > 200 > right[2]


def test_writer_converts_odd_images_and_skips_broken_ones(odd: dict, tmp_path: Path, caplog) -> None:
    root = tmp_path / "folder"
    for name, (ext, data) in odd.items():
        (root / "cls").mkdir(parents=True, exist_ok=True)
        (root / "cls" / f"{name}.{ext}").write_bytes(data)
    with caplog.at_level(logging.WARNING):
        status = make_shards.main(["--source", str(root), "--out", str(tmp_path / "out")])
    assert status == 0
    index = load_index(tmp_path / "out")
    assert index["samples"] == len(odd) - len(BROKEN) and index["skipped"] == len(BROKEN)
    skipped = {Path(s["source"]).stem: s["error"] for s in index["skipped_files"]}
    assert set(skipped) == set(BROKEN)
    assert "DecompressionBombError" in skipped["bomb"] and "truncated" in skipped["truncated"]
    assert all(f"{name}.{odd[name][0]}" in caplog.text for name in BROKEN)  # warned, by file

    stored = {}
    for url in index["urls"]:
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if ext == "jpg":
                    stored[key.removeprefix("cls_")] = tar.extractfile(member).read()
    assert set(stored) == set(odd) - set(BROKEN)
    for name, data in stored.items():
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.mode in ("L", "RGB"), name
            assert im.getexif().get(0x0112, 1) == 1, name  # no rotation left for readers
            pixels = np.asarray(im.convert("RGB"))
        if name == "exif_rotated":
            assert im.size == (20, 40) and _is_blue_left_red_right(pixels)
        if name == "rgba":
            assert pixels.min() > 245  # transparent -> white
        if name == "png16":
            assert abs(pixels.mean() - 40000 / 257) < 3  # 16 bits scaled to 8, not clipped
    assert stored["rgb"] == odd["rgb"][1]  # a plain JPEG is kept byte for byte


def test_training_decoder_makes_rgb_of_odd_images_and_counts_broken_ones(odd: dict, odd_shard: Path) -> None:
    good = len(odd) - len(BROKEN)
    stream = iter(_streams([odd_shard], batch_size=good))
    batch = next(stream)  # exactly one pass over the shard's usable samples
    assert batch.images.shape == (good, 3, SIZE, SIZE) and batch.images.dtype == torch.uint8
    assert batch.corrupt == len(BROKEN) and batch.shard_errors == 0
    names = list(odd)
    labels = batch.labels.tolist()
    assert sorted(labels) == [i for i, n in enumerate(names) if n not in BROKEN]  # every good one, once
    images = {names[label]: batch.images[j].permute(1, 2, 0).numpy() for j, label in enumerate(labels)}
    assert _is_blue_left_red_right(images["exif_rotated"])  # upright, like the writer stores it
    assert images["rgba"].min() > 245 and abs(images["png16"].mean() - 40000 / 257) < 3
    assert (images["tiny_png"] == RED).all()


def test_eval_reader_makes_rgb_of_odd_images_and_names_a_broken_one(odd: dict, odd_shard: Path,
                                                                    tmp_path: Path) -> None:
    usable = [(n, ext, data, i) for i, (n, (ext, data)) in enumerate(odd.items()) if n not in BROKEN]
    images, labels = load_images([str(_write_tar(tmp_path / "good.tar", usable))], SIZE)
    assert images.shape == (len(usable), 3, SIZE, SIZE) and labels.tolist() == [i for *_, i in usable]
    rotated = images[[n for n, *_ in usable].index("exif_rotated")].permute(1, 2, 0).numpy()
    assert _is_blue_left_red_right(rotated)
    sideways, upright = _sideways()
    expected = decode_center_crop(_bytes(upright, "JPEG", quality=95), SIZE)
    assert np.abs(decode_center_crop(sideways, SIZE).astype(int) - expected).mean() < 8
    with pytest.raises(EvalDataError, match=r"sample truncated of .*odd-000000.tar: cannot decode.*rebuild"):
        load_images([str(odd_shard)], SIZE)
    (tmp_path / "gone.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(EvalDataError, match=r"cannot read eval shard .*gone.tar \(ReadError"):
        load_images([str(tmp_path / "good.tar"), str(tmp_path / "gone.tar")], SIZE)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_lowered_pixel_limit_skips_the_large_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 // 2)  # error above 2x: 40x40 passes, 48x40 not
    shard = _write_tar(tmp_path / "s.tar", [("small", "jpg", _bytes(_photo(size=(40, 40)), "JPEG"), 0),
                                            ("large", "jpg", _bytes(_photo(size=(48, 40)), "JPEG"), 1)])
    batch = next(iter(_streams([shard], batch_size=3)))
    assert batch.corrupt >= 1 and set(batch.labels.tolist()) == {0}


# ----------------------------------------------------------------------------- shards mid-run


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three shards of six small JPEGs; a sample's label is its shard's number."""
    root = tmp_path_factory.mktemp("shards")
    jpeg = _bytes(_photo(size=(36, 36)), "JPEG")
    return [_write_tar(root / f"s-{s:06d}.tar", [(f"s{s}_{i}", "jpg", jpeg, s) for i in range(6)])
            for s in range(3)]


@pytest.fixture
def shards(shard_set: list[Path], tmp_path: Path) -> list[Path]:
    """A private copy of the shard set, for a test to break."""
    return [Path(shutil.copy(p, tmp_path / p.name)) for p in shard_set]


def test_a_shard_that_vanishes_or_breaks_mid_run_is_skipped_and_counted(shards: list[Path], caplog) -> None:
    stream = iter(_streams(shards, shuffle_buffer=4))
    assert all(next(stream).shard_errors == 0 for _ in range(3))
    shards[1].unlink()  # disappears
    shards[2].write_bytes(b"this is no longer a tar file" * 40)  # becomes unreadable
    with caplog.at_level(logging.WARNING):
        after = [next(stream) for _ in range(30)]
    assert all(b.images.shape == (4, 3, SIZE, SIZE) for b in after)
    assert after[-1].shard_errors >= 2 and after[-1].corrupt == 0
    assert {label for b in after[-10:] for label in b.labels.tolist()} == {0}  # only the good shard is left
    assert str(shards[1]) in caplog.text and str(shards[2]) in caplog.text and "next segment" in caplog.text


def test_shard_errors_reach_the_checkpointed_loader_state(shards: list[Path]) -> None:
    shards[1].unlink()
    loader = TrainLoader([str(p) for p in shards], batch_size=4, image_size=SIZE, crop_scale=(0.5, 1.0),
                         mean=(0.5,) * 3, std=(0.5,) * 3, mask_generator=MaskGenerator(SIZE // 4, MaskConfig(min_keep=4)),
                         seed=0, num_workers=0, shuffle_buffer=2)
    for _ in range(12):
        next(loader)
    assert loader.shard_errors_total >= 1 and loader.corrupt_total == 0
    saved = loader.state.to_rows()  # what TrainState checkpoints
    assert LoaderState.from_rows(saved) == loader.state
    assert sum(row[3] for row in saved) == loader.shard_errors_total


def test_a_resumed_stream_matches_while_the_same_shard_is_missing(shards: list[Path]) -> None:
    shards[1].unlink()
    straight = iter(_streams(shards, shuffle_buffer=4))
    first = [next(straight) for _ in range(8)]
    assert first[-1].shard_errors >= 1
    resumed = iter(_streams(shards, shuffle_buffer=4, start_step=4, positions={0: first[3].position}))
    for expected in first[4:]:
        batch = next(resumed)
        assert batch.position == expected.position and torch.equal(batch.images, expected.images)


def test_a_truncated_shard_gives_what_it_holds_before_the_cut(shards: list[Path]) -> None:
    with tarfile.open(shards[0]) as tar:
        fifth = tar.getmembers()[8]  # the image of sample 4 (jpg, cls per sample)
    with open(shards[0], "r+b") as f:  # cut in the middle of its data
        f.truncate(fifth.offset_data + fifth.size // 2)
    stream = iter(_streams(shards[:1], batch_size=3))
    batches = [next(stream) for _ in range(4)]  # never raises: each segment yields a few samples
    assert batches[-1].shard_errors >= 2
    assert all(b.labels.tolist() == [0, 0, 0] for b in batches)


def test_when_every_shard_is_gone_the_loader_says_so(shards: list[Path]) -> None:
    loader = TrainLoader([str(p) for p in shards], batch_size=2, image_size=SIZE, crop_scale=(0.5, 1.0),
                         mean=(0.5,) * 3, std=(0.5,) * 3, mask_generator=MaskGenerator(SIZE // 4, MaskConfig(min_keep=4)),
                         seed=0, num_workers=1, shuffle_buffer=2)
    assert next(loader).images.shape == (2, 3, SIZE, SIZE)
    for shard in shards:
        shard.unlink()
    with pytest.raises(ShardDataError, match=r"none of the 3 shard\(s\) of rank 0 gives a usable sample.*s-0000"):
        for _ in range(50):  # the worker has a few batches in flight, then runs dry
            next(loader)


def test_shards_of_only_corrupt_or_no_images_fail_clearly(odd: dict, shards: list[Path], tmp_path: Path) -> None:
    corrupt = _write_tar(tmp_path / "corrupt.tar", [(f"c{i}", "jpg", odd["truncated"][1], 0) for i in range(5)])
    empty = _write_tar(tmp_path / "empty.tar", [])
    with pytest.raises(ShardDataError, match="corrupt.tar: only corrupt samples"):
        next(iter(_streams([corrupt])))
    with pytest.raises(ShardDataError, match="empty.tar: no samples"):
        next(iter(_streams([empty])))
    mixed = iter(_streams([corrupt, empty, shards[0]]))
    batches = [next(mixed) for _ in range(6)]  # the good shard carries the stream
    assert batches[-1].corrupt > 0 and set(batches[-1].labels.tolist()) == {0}


def test_a_stream_resumed_at_the_end_of_its_only_shard_goes_on(shards: list[Path]) -> None:
    stream = iter(_streams(shards[:1], batch_size=6))
    first = next(stream)
    assert first.position == (0, 6)  # the whole shard: resuming skips all of segment 0
    resumed = next(iter(_streams(shards[:1], batch_size=6, start_step=1, positions={0: first.position})))
    assert resumed.position == (1, 6)


# ----------------------------------------------------------------------------- index vs tars


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    for c in range(2):
        (root / f"c{c}").mkdir()
        for i in range(4):
            _photo(size=(20, 20)).save(root / f"c{c}" / f"{i}.jpg")
    out = tmp_path_factory.mktemp("built")
    build_shards(root, out, shard_size=3)
    return out


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "set"))


def _edit_index(directory: Path, change) -> None:
    index = json.loads((directory / "index.json").read_text())
    change(index)
    (directory / "index.json").write_text(json.dumps(index))


def test_an_index_that_lists_a_missing_shard_fails_before_reading(copy: Path) -> None:
    (copy / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-000001.tar listed in .* is missing; rebuild with: "
                                                r"scalejepa-make-shards --source"):
        resolve_shards(str(copy))


def test_an_index_with_wrong_sample_counts_fails_before_reading(copy: Path) -> None:
    _edit_index(copy, lambda index: index.update(samples=index["samples"] + 1))
    with pytest.raises(ShardIndexError, match="'samples' is 9 but the shards hold 8"):
        resolve_shards(str(copy))
    _edit_index(copy, lambda index: index["shards"][0].update(samples=-1))
    with pytest.raises(ShardIndexError, match="bad shard entry"):
        resolve_shards(str(copy))


def test_a_replaced_or_truncated_shard_fails_before_reading(copy: Path, shard_set: list[Path]) -> None:
    shutil.copy(shard_set[0], copy / "shard-000001.tar")  # another tar, other samples
    with pytest.raises(ShardIndexError, match=r"shard-000001.tar has \d+ bytes, index.json says \d+"):
        resolve_shards(str(copy))


def test_per_shard_counts_are_trusted_and_cannot_stall_training(copy: Path) -> None:
    # Counts inside tars are not recounted (that would read every header); the loader
    # resamples shards, so a wrong count only changes the epoch length, never blocks.
    def inflate(index: dict) -> None:
        for shard in index["shards"]:
            shard["samples"] = 100
        index["samples"] = 100 * len(index["shards"])

    _edit_index(copy, inflate)
    urls, index = resolve_shards(str(copy))
    assert index["samples"] == 300
    batches = [next(s) for s in [iter(_streams(urls, batch_size=8))] for _ in range(3)]
    assert batches[-1].images.shape == (8, 3, SIZE, SIZE)


def test_empty_or_unindexed_shard_directories_are_clear_errors(copy: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shard index at .*empty/index.json; build one with"):
        resolve_shards(str(tmp_path / "empty"))
    (copy / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="pass the 3 tar file.* as a brace URL"):
        resolve_shards(str(copy))
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "index.json").write_text(json.dumps({
        "format": "scalejepa-shards", "format_version": 1, "samples": 0, "shards": [], "classes": [],
        "url": "", "source": "x", "created": "2026-01-01T00:00:00Z"}))
    with pytest.raises(ValueError, match="names no shards"):
        resolve_shards(str(tmp_path / "none"))
    (tmp_path / "none" / "index.json").write_text("{not json")
    with pytest.raises(ShardIndexError, match="not valid JSON"):
        resolve_shards(str(tmp_path / "none"))
