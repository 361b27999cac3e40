import time

import numpy as np
import pytest

from scalejepa.config import MaskConfig
from scalejepa.masks import MaskGenerator, mask_rng


def draw(generator, batch_size=8, batches=200, seed=0):
    for step in range(batches):
        yield generator.sample_masks(batch_size, mask_rng(seed, 0, 0, step))


def target_shapes(mode, batches=300):
    generator = MaskGenerator(16, MaskConfig(mode=mode))
    shapes = set()
    for _, targets in draw(generator, batch_size=1, batches=batches):
        rows, cols = np.nonzero(targets[0, 0].reshape(16, 16))
        shapes.add((int(np.ptp(rows)) + 1, int(np.ptp(cols)) + 1))
    wide = [h * w for h, w in shapes if h < w]
    tall = [h * w for h, w in shapes if h > w]
    return shapes, wide, tall


def test_reference_quirk_1_one_draw_sets_scale_and_aspect():
    # One uniform number drives both: small target blocks are always wide, large ones tall.
    shapes, wide, tall = target_shapes("reference")
    assert len(shapes) >= 4 and wide and tall
    assert max(wide) <= min(tall), sorted(shapes)


def test_reference_quirks_2_and_3_last_row_and_column_unused_and_context_top_left():
    generator = MaskGenerator(16, MaskConfig(mode="reference"))
    top_left = np.zeros((16, 16), dtype=bool)
    top_left[:15, :15] = True
    for context, targets in draw(generator):
        for masks in (context.reshape(-1, 16, 16), targets.reshape(-1, 16, 16)):
            assert not masks[:, 15, :].any() and not masks[:, :, 15].any()
        # The context is the top-left 15x15 square minus the targets (minus fewer targets
        # when too little is left and the reference relaxes its constraint).
        c = context.reshape(-1, 16, 16)
        union = targets.any(1).reshape(-1, 16, 16)
        assert not (c & ~top_left).any()
        assert (c | ~(top_left & ~union)).all()


def test_reference_quirk_4_truncation_to_batch_minimum_in_raster_order():
    config = MaskConfig(mode="reference", context="truncate")
    generator = MaskGenerator(16, config)
    rng_a, rng_b = mask_rng(0, 0, 0, 5), mask_rng(0, 0, 0, 5)
    full, _ = generator.sample_masks(128, rng_a)
    batch = generator(128, rng_b)
    keep = int(full.sum(1).min())
    assert batch.context.seqs.uniform_len == keep
    index = batch.context.index.view(128, keep).numpy()
    for b in range(128):
        assert (index[b] == np.nonzero(full[b])[0][:keep]).all()  # the first patches in raster order
    mean_sampled = full.sum(1).mean()
    assert 90 < mean_sampled < 130 and keep < 0.8 * mean_sampled  # ~110 sampled, ~68 kept at 128 per batch


def test_corrected_mode_reaches_last_row_and_column_and_moves_the_context():
    generator = MaskGenerator(16, MaskConfig(mode="corrected"))
    seen_target_edge = seen_context_edge = False
    context_corners = set()
    for context, targets in draw(generator):
        t = targets.reshape(-1, 16, 16)
        c = context.reshape(-1, 16, 16)
        seen_target_edge |= bool(t[:, 15, :].any() and t[:, :, 15].any())
        seen_context_edge |= bool(c[:, 15, :].any() and c[:, :, 15].any())
        rows, cols = np.nonzero(c[0])
        context_corners.add((rows.min(), cols.min()))
    assert seen_target_edge and seen_context_edge
    assert len(context_corners) > 1


def test_corrected_mode_draws_scale_and_aspect_independently():
    shapes, wide, tall = target_shapes("corrected")
    assert max(wide) > min(tall), sorted(shapes)  # a large wide block: impossible in the reference


@pytest.mark.parametrize("mode", ["reference", "corrected"])
def test_targets_and_context_never_overlap_and_respect_min_keep(mode):
    generator = MaskGenerator(16, MaskConfig(mode=mode))
    for context, targets in draw(generator, batch_size=16, batches=50):
        assert (context.sum(1) > 10).all()
        overlap = (context[:, None, :] & targets).sum()
        assert overlap == 0


def test_pack_keeps_every_context_truncate_cuts_to_the_minimum():
    pack = MaskGenerator(16, MaskConfig(context="pack"))(32, mask_rng(1, 0, 0, 3))
    truncate = MaskGenerator(16, MaskConfig(context="truncate"))(32, mask_rng(1, 0, 0, 3))
    lengths = (pack.context.seqs.cu_seqlens[1:] - pack.context.seqs.cu_seqlens[:-1]).tolist()
    assert pack.context_tokens == pack.context_sampled == sum(lengths)
    assert truncate.context_sampled == pack.context_sampled
    assert truncate.context_tokens == 32 * min(lengths)
    assert pack.context.seqs.uniform_len is None and pack.context.seqs.max_seqlen == max(lengths)
    assert pack.target_index.equal(truncate.target_index)


def test_predictor_layout_puts_mask_tokens_after_each_context():
    batch = MaskGenerator(16, MaskConfig(context="pack"))(4, mask_rng(0, 0, 0, 0))
    ctx_lens = (batch.context.seqs.cu_seqlens[1:] - batch.context.seqs.cu_seqlens[:-1]).tolist()
    tgt_lens = (batch.target_seqs.cu_seqlens[1:] - batch.target_seqs.cu_seqlens[:-1]).tolist()
    pred_cu = batch.predictor_seqs.cu_seqlens.tolist()
    rows = batch.predictor_target_rows.tolist()
    expected = []
    for s in range(16):  # s = m * B + b
        start = pred_cu[s] + ctx_lens[s % 4]
        expected += list(range(start, start + tgt_lens[s]))
        assert pred_cu[s + 1] - pred_cu[s] == ctx_lens[s % 4] + tgt_lens[s]
    assert rows == expected
    flat = batch.target_flat.tolist()
    seq_of = np.repeat(np.arange(16), tgt_lens)
    assert flat == [(s % 4) * 256 + i for s, i in zip(seq_of, batch.target_index.tolist())]


def test_masks_are_reproducible_and_differ_across_ranks_workers_and_steps():
    generator = MaskGenerator(16, MaskConfig(mode="corrected", context="pack"))
    a = generator(16, mask_rng(7, 0, 0, 3))
    b = generator(16, mask_rng(7, 0, 0, 3))
    assert a.context.index.equal(b.context.index) and a.target_index.equal(b.target_index)
    for other in (mask_rng(7, 1, 0, 3), mask_rng(7, 0, 1, 3), mask_rng(7, 0, 0, 4)):
        c = generator(16, other)
        assert not (c.context.index.shape == a.context.index.shape and c.context.index.equal(a.context.index))


def test_impossible_settings_fail_clearly():
    with pytest.raises(ValueError, match="min_keep"):
        MaskGenerator(8, MaskConfig(min_keep=10))


def test_batch_of_128_on_16x16_is_fast():
    generator = MaskGenerator(16, MaskConfig())
    generator(128, mask_rng(0, 0, 0, 0))
    times = []
    for step in range(20):
        start = time.perf_counter()
        generator(128, mask_rng(0, 0, 0, step))
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.020, f"median {np.median(times) * 1e3:.1f} ms"
