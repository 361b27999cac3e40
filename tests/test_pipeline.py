"""The training input pipeline: decode paths, corrupt samples, deterministic resume."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from scalejepa.config import MaskConfig
from scalejepa.data.pipeline import ShardStreams, TrainLoader, split_by_rank
from scalejepa.data.transforms import decode_center_crop, decode_random_crop, random_resized_crop_box
from scalejepa.masks import MaskGenerator


def encode(image: Image.Image, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def photo(mode="RGB", size=(96, 64)):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, data, label in samples:
            for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"),
                                       ("P", "PNG")])
def test_every_image_mode_becomes_rgb(mode, fmt):
    data = encode(photo(mode), fmt)
    out = decode_random_crop(data, 32, (0.3, 1.0), np.random.default_rng(0))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert decode_center_crop(data, 32).shape == (32, 32, 3)


def test_jpeg_draft_decode_matches_full_decode_closely():
    image = photo(size=(1024, 768))
    data = encode(image)
    full = decode_random_crop(data, 64, (0.3, 1.0), np.random.default_rng(3), draft=False).astype(float)
    draft = decode_random_crop(data, 64, (0.3, 1.0), np.random.default_rng(3), draft=True).astype(float)
    assert np.abs(full - draft).mean() < 40  # same crop, reduced-scale DCT decode of noise


def test_random_resized_crop_stays_inside_and_respects_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(640, 427, (0.3, 1.0), rng)
        assert 0 <= left and left + w <= 640 and 0 <= top and top + h <= 427
        assert 0.3 * 640 * 427 * 0.9 <= w * h <= 640 * 427


def make_streams(shards, **kwargs):
    defaults = dict(batch_size=4, image_size=32, crop_scale=(0.5, 1.0),
                    mask_generator=MaskGenerator(8, MaskConfig(min_keep=4)), seed=0, rank=0, num_streams=1,
                    shuffle_buffer=8)
    return ShardStreams([str(s) for s in shards], **{**defaults, **kwargs})


def test_corrupt_jpeg_in_a_shard_is_skipped_and_counted(tmp_path):
    good = encode(photo())
    samples = [(f"s{i:03d}", good, i % 3) for i in range(9)]
    samples.insert(4, ("bad000", b"\xff\xd8\xff\xe0 this is not a jpeg", 1))
    write_shard(tmp_path / "a.tar", samples)
    stream = iter(make_streams([tmp_path / "a.tar"], shuffle_buffer=1))
    batches = [next(stream) for _ in range(5)]  # 20 good images = two passes and a bit over the shard
    assert all(b.images.shape == (4, 3, 32, 32) for b in batches)
    assert batches[1].corrupt == 1 and batches[-1].corrupt == 2
    assert batches[0].labels.tolist() == [0, 1, 2, 0]


def test_data_order_resumes_exactly_from_a_position(tmp_path):
    for s in range(3):
        write_shard(tmp_path / f"{s}.tar", [(f"k{s}_{i}", encode(photo()), i) for i in range(7)])
    shards = sorted(tmp_path.glob("*.tar"))
    straight = iter(make_streams(shards))
    first = [next(straight) for _ in range(6)]
    resumed = iter(make_streams(shards, start_step=3, positions={0: first[2].position}))
    for expected in first[3:]:
        batch = next(resumed)
        assert batch.step == expected.step
        assert torch.equal(batch.images, expected.images) and torch.equal(batch.labels, expected.labels)
        assert torch.equal(batch.masks.context.index, expected.masks.context.index)


def test_two_workers_resume_like_one_run(tmp_path):
    for s in range(2):
        write_shard(tmp_path / f"{s}.tar", [(f"k{s}_{i}", encode(photo()), i) for i in range(5)])
    shards = [str(p) for p in sorted(tmp_path.glob("*.tar"))]
    kwargs = dict(batch_size=2, image_size=32, crop_scale=(0.5, 1.0), mean=(0.5,) * 3, std=(0.5,) * 3,
                  mask_generator=MaskGenerator(8, MaskConfig(min_keep=4)), seed=1, num_workers=2, shuffle_buffer=4)
    loader = TrainLoader(shards, **kwargs)
    straight = [next(loader) for _ in range(8)]
    assert [b.step for b in straight] == list(range(8)) and [b.stream for b in straight] == [0, 1] * 4
    # Stop after step 4 (5 batches taken): resume at 5 with the recorded positions.
    partial = TrainLoader(shards, **kwargs)
    for _ in range(5):
        next(partial)
    resumed = TrainLoader(shards, **kwargs, start_step=5, state=partial.state)
    for expected in straight[5:]:
        batch = next(resumed)
        assert batch.step == expected.step and torch.equal(batch.images, expected.images)


def test_split_by_rank_is_explicit():
    urls = [f"s{i}.tar" for i in range(5)]
    assert split_by_rank(urls, 0, 2) == ["s0.tar", "s2.tar", "s4.tar"]
    assert split_by_rank(urls, 1, 2) == ["s1.tar", "s3.tar"]
    assert split_by_rank(urls[:1], 1, 2) == ["s0.tar"]  # fewer shards than ranks: all of them


def test_a_missing_shard_is_a_clear_error(tmp_path):
    from scalejepa.data.shard_index import resolve_shards

    with pytest.raises(FileNotFoundError, match="does not exist .*scalejepa-make-shards"):
        resolve_shards(str(tmp_path / "missing-{000000..000003}.tar"))
