"""Tile grid, Hann blending and the one tile loop, blend_tiles (no model involved)."""

from __future__ import annotations

import logging

import pytest
import torch

from tadisr_core.tiling import (
    WINDOW_FLOOR,
    UpscaleCancelled,
    blend_tiles,
    extract_units,
    hann_1d,
    make_grid,
    run_batches,
    tile_starts,
)


def _blend(fn, image, tile, overlap, batch_size=1, *, multiple=1, shrink=True, **loop) -> list[torch.Tensor]:
    """The canvases blend_tiles makes of `fn` (tiles [n, C, th, tw] -> list of outputs) over `image`'s tiles,
    the units cut as the pipeline cuts them (extract_units)."""
    grid = make_grid(image.shape[-2], image.shape[-1], tile, overlap, multiple, shrink)
    return blend_tiles(grid, image.shape[0], lambda units: fn(extract_units(image, grid, units)), batch_size,
                       device=image.device, **loop)


def test_tile_starts_follow_the_release_rule():
    assert tile_starts(1021, 384, 128) == [0, 256, 512, 637]   # range(0, L-t+1, 256) + [L-t]
    assert tile_starts(1024, 384, 128) == [0, 256, 512, 640]   # last start lands exactly, not duplicated
    assert tile_starts(768, 768, 256) == [0]
    assert tile_starts(100, 768, 256) == [0]
    assert tile_starts(769, 768, 256) == [0, 1]
    for tile, overlap in ((64, 64), (64, 80), (64, -1), (0, 0)):
        with pytest.raises(ValueError):
            tile_starts(100, tile, overlap)


def test_short_sides_get_one_tile_rounded_to_the_multiple():
    g = make_grid(20, 203, 64, 16, multiple=8)
    assert (g.tile_h, g.tile_w) == (24, 64) and g.ys == (0,) and g.xs == (0, 48, 96, 139)
    g = make_grid(20, 203, 64, 16, multiple=8, shrink=False)
    assert (g.tile_h, g.tile_w) == (64, 64)
    with pytest.raises(ValueError):
        make_grid(20, 20, 60, 16, multiple=8)


def test_window_is_a_clamped_symmetric_hann():
    w = hann_1d(65)
    assert w.min().item() == pytest.approx(WINDOW_FLOOR)
    assert w[32].item() == pytest.approx(1.0)
    assert torch.allclose(w, w.flip(0), atol=1e-7)
    ref = torch.hann_window(64, periodic=False).clamp_min(1e-3)
    assert torch.equal(hann_1d(64), ref)


SHAPES = [
    (1, 3, 101, 87),     # odd, several tiles both ways
    (2, 3, 30, 21),      # smaller than a tile, batch of two images
    (1, 1, 20, 203),     # one side short (the release gives NaN here)
    (1, 4, 203, 20),     # the other side short, 4 channels
    (1, 3, 9, 700),      # very wide
    (1, 3, 64, 64),      # exactly one tile
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shrink", [True, False])
def test_identity_reconstructs_the_input(shape, shrink):
    torch.manual_seed(0)
    x = torch.rand(shape)
    image, first = _blend(lambda t: [t, t[:, :1] * 2 - 1], x, 64, 16, batch_size=3, multiple=8, shrink=shrink)
    assert image.shape == x.shape and first.shape == (shape[0], 1, *shape[2:])
    assert torch.isfinite(image).all() and torch.isfinite(first).all()
    assert (image - x).abs().max().item() < 1e-4
    assert (first - (x[:, :1] * 2 - 1)).abs().max().item() < 1e-4


def test_release_tiling_test_case():
    """The release's own check: 1021x887, tile 384, overlap 128, identity, within 1e-4."""
    torch.manual_seed(1)
    x = torch.rand(1, 3, 1021, 887)
    assert (_blend(lambda t: [t], x, 384, 128)[0] - x).abs().max().item() < 1e-4


def _per_tile(t: torch.Tensor) -> list[torch.Tensor]:
    # Depends on the whole tile (its mean), so a tile placed wrongly would show; exact per sample.
    return [torch.tanh(3 * t) + t.mean(dim=(1, 2, 3), keepdim=True)]


@pytest.mark.parametrize("shape", [(1, 3, 101, 87), (2, 3, 40, 150)])
def test_batched_tiles_equal_batch_one(shape):
    torch.manual_seed(2)
    x = torch.rand(shape)
    [one] = _blend(_per_tile, x, 48, 16, batch_size=1)
    [many] = _blend(_per_tile, x, 48, 16, batch_size=5)
    assert (one - many).abs().max().item() < 1e-6
    # and the blend is a weighted mean of the per-tile results: stays within their range
    assert one.min() >= (torch.tanh(3 * x) + 0).min() - 1e-5


def test_blend_weights_follow_the_window():
    """Constant tiles: a pixel covered by one tile gets its value; overlaps interpolate between them."""
    x = torch.zeros(1, 1, 8, 112)          # tiles at x = 0, 48 (tile 64, overlap 16)
    calls = iter(range(10))
    [out] = _blend(lambda t: [torch.full_like(t, float(next(calls)))], x, 64, 16)
    assert out[0, 0, 0, :48].eq(0).all()
    assert torch.allclose(out[0, 0, 0, 64:], torch.ones(48), atol=1e-6)
    mid = out[0, 0, 0, 48:64]
    assert (mid[1:] >= mid[:-1]).all() and 0 < mid[8].item() < 1


def test_output_of_the_wrong_size_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        _blend(lambda t: [t[:, :, :-1]], torch.rand(1, 3, 40, 40), 32, 8)


def test_progress_and_cancel_between_tiles():
    x = torch.rand(1, 3, 100, 100)          # 3 x 3 tiles of 48 / overlap 16
    seen, calls = [], []

    def fn(t):
        calls.append(t.shape[0])
        return [t]

    _blend(fn, x, 48, 16, batch_size=2, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(k, 9) for k in range(1, 10)]
    calls.clear()
    with pytest.raises(UpscaleCancelled) as err:
        _blend(fn, x, 48, 16, cancel=lambda: len(calls) >= 4)
    assert len(calls) == 4 and err.value.done == 4 and err.value.total == 9


def test_out_of_memory_halves_the_batch(caplog):
    x = torch.rand(1, 3, 100, 100)
    sizes = []

    def fn(t):
        sizes.append(t.shape[0])
        if t.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return [t]

    with caplog.at_level(logging.WARNING, logger="tadisr"):
        [out] = _blend(fn, x, 48, 16, batch_size=8)
    assert (out - x).abs().max().item() < 1e-4
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2
    assert "retrying with 4" in caplog.text and "retrying with 2" in caplog.text


def test_other_errors_propagate_and_oom_at_batch_one_propagates():
    def boom(units):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batches(4, 2, boom)

    def oom(units):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        run_batches(4, 1, oom)
