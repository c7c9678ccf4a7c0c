"""The authors' augmentation: ADM centre crop, random resize-and-crop inside the image, the 350 -> 375 schedule."""

import math

import numpy as np
import pytest
from PIL import Image

from spheregen.data.augment import (
    CropSchedule,
    center_crop,
    crop_window,
    item_rng,
    preprocess,
    random_crop,
    resize_short_side,
)


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w,h,size", [(500, 375, 64), (97, 211, 32), (40, 30, 32), (128, 128, 64)])
def test_center_crop_follows_adm(w, h, size):
    """BOX-halve while the short side >= 2 size, BICUBIC to short side = size, central window."""
    im = _photo(w, h)
    out = center_crop(im, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    ref = im
    halvings = 0
    while min(ref.size) >= 2 * size:
        ref = ref.resize((ref.width // 2, ref.height // 2), Image.Resampling.BOX)
        halvings += 1
    assert halvings == max(0, int(math.floor(math.log2(min(w, h) / size))))
    s = size / min(ref.size)
    ref = np.asarray(ref.resize((round(ref.width * s), round(ref.height * s)), Image.Resampling.BICUBIC))
    top, left = (ref.shape[0] - size) // 2, (ref.shape[1] - size) // 2
    assert np.array_equal(out, ref[top:top + size, left:left + size])


def test_random_crops_lie_inside_the_resized_image():
    im = _photo(300, 200)
    size, shorts, tops, lefts = 64, set(), set(), set()
    for i in range(200):
        arr, top, left = crop_window(im, size, item_rng(0, 0, i), max_scale=1.25)
        s = min(arr.shape[:2])
        assert size <= s <= math.ceil(size * 1.25)
        assert 0 <= top <= arr.shape[0] - size and 0 <= left <= arr.shape[1] - size
        assert abs(arr.shape[1] / arr.shape[0] - 1.5) < 0.05  # aspect kept
        crop = random_crop(im, size, item_rng(0, 0, i))
        assert np.array_equal(crop, arr[top:top + size, left:left + size])
        shorts.add(s)
        tops.add(top)
        lefts.add(left)
    assert len(shorts) > 5 and len(lefts) > 10  # the choices vary
    assert min(shorts) == size and max(shorts) == math.ceil(size * 1.25)


def test_schedule_is_one_then_linear_to_zero():
    sch = CropSchedule(350, 375)
    assert [sch.prob(e) for e in (0, 100, 349, 350)] == [1.0, 1.0, 1.0, 1.0]
    for e in range(351, 375):
        assert sch.prob(e) == pytest.approx((375 - e) / 25)
    assert sch.prob(375) == 0.0 and sch.prob(399) == 0.0
    assert all(sch.prob(e) >= sch.prob(e + 1) for e in range(400))
    with pytest.raises(ValueError):
        CropSchedule(10, 5)


def test_preprocess_rates_and_p0_reproduces_center_crops():
    im, size = _photo(120, 90, seed=3), 32
    center = center_crop(im, size)
    sch = CropSchedule(2, 6)
    for epoch in (6, 7, 50):  # p = 0: exactly the centre crop, whatever the index
        for i in range(20):
            assert np.array_equal(preprocess(im, size, sch, 0, epoch, i), center)
    assert np.array_equal(preprocess(im, size, None, 0, 0, 0), center)
    # p = 1 (epoch <= 2): random crops, mostly not the centre one; p = 0.5 at epoch 4: about half
    n = 300
    random_share = np.mean([not np.array_equal(preprocess(im, size, sch, 0, 1, i), center) for i in range(n)])
    half_share = np.mean([not np.array_equal(preprocess(im, size, sch, 0, 4, i), center) for i in range(n)])
    assert random_share > 0.9
    assert 0.35 < half_share < 0.65
    # deterministic in (seed, epoch, index)
    assert np.array_equal(preprocess(im, size, sch, 5, 1, 7), preprocess(im, size, sch, 5, 1, 7))


def test_resize_short_side_keeps_small_images():
    out = resize_short_side(_photo(20, 10), 16)
    assert min(out.size) == 16 and out.size == (32, 16)
