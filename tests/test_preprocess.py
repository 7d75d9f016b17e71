"""cspine.preprocess: window values, the spine crop on phantoms and real CT, shapes and types."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from skimage.filters import threshold_otsu

from cspine.dicom import read_hu
from cspine.phantom import PhantomConfig, render_study
from cspine.preprocess import (
    WINDOWS,
    _body,
    otsu_crop_box,
    otsu_threshold,
    preprocess_slice,
    preprocess_study,
    spine_mask,
    study_crop_box,
    window,
)


def test_paper_windows():
    assert WINDOWS == (
        ("soft_tissue", 80.0, 300.0),
        ("standard_bone", 500.0, 1800.0),
        ("gross_bone", 400.0, 650.0),
    )


@pytest.mark.parametrize("name,center,width", WINDOWS)
def test_window_is_exact_at_ends_and_middle(name, center, width):
    hu = np.array(
        [center - width / 2, center, center + width / 2, center - width, center + width, center + width / 4]
    )
    out = window(hu, center, width)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 0.0, 1.0, 0.75], atol=1e-6)


def test_otsu_matches_skimage():
    rng = np.random.default_rng(0)
    values = (
        np.concatenate([rng.normal(40, 10, 5000), rng.normal(200, 20, 1000)]).clip(0, 255).astype(np.uint8)
    )
    assert abs(otsu_threshold(values) - threshold_otsu(values)) <= 1


@pytest.fixture(scope="module")
def phantom():
    return render_study(np.random.default_rng(4), PhantomConfig(image_size=128, n_slices=60))


def _inside(box, mask):
    y0, y1, x0, x1 = box
    rows, cols = np.nonzero(mask)
    return rows.min() >= y0 and rows.max() < y1 and cols.min() >= x0 and cols.max() < x1


def test_box_holds_the_whole_spine_and_leaves_out_table_and_padding(phantom):
    checked = with_table = 0
    for k in range(len(phantom.hu)):
        vertebra = (phantom.labels[k] >= 1) & (phantom.labels[k] <= 7)
        if vertebra.sum() < 30:
            continue
        box = otsu_crop_box(phantom.hu[k])
        assert _inside(box, vertebra), k
        body_rows = np.flatnonzero(_body(phantom.hu[k])[0].any(axis=1))
        # the table, under the patient, in the field of view
        if (phantom.hu[k, body_rows[-1] + 1 :] > -400).any():
            assert box[1] <= body_rows[-1] + 1, k
            with_table += 1
        y0, y1, x0, x1 = box
        assert (phantom.hu[k, y0:y1, x0:x1] > -1500).all(), k  # no field-of-view padding inside
        assert (y1 - y0) * (x1 - x0) < 0.35 * 128 * 128, k
        checked += 1
    assert checked > 30 and with_table > 20


def test_box_excludes_lateral_bones(phantom):
    k = int(np.flatnonzero((phantom.labels == 8).any(axis=(1, 2)))[-1])  # a T1 slice: ribs and clavicles
    hu = phantom.hu[k]
    lateral_bone = (hu > 500) & (phantom.labels[k] == 0)
    cols = np.flatnonzero(lateral_bone.any(axis=0))
    assert len(cols) and (cols.min() < 30 or cols.max() > 98)
    y0, y1, x0, x1 = otsu_crop_box(hu)
    assert x0 > cols.min() and x1 <= cols.max()


def test_real_spine_slice_excludes_ribs():
    hu = read_hu(get_testdata_file("bad_sequence.dcm"))  # lumbar/thoracic vertebra with ribs beside it
    y0, y1, x0, x1 = otsu_crop_box(hu)
    bone = hu > 300
    # the vertebra sits in the middle columns; ribs are bone at the far left and right
    assert bone[:, :100].any() and bone[:, 420:].any()
    assert x0 >= 100 and x1 <= 420
    mask = spine_mask(hu)
    assert _inside((y0, y1, x0, x1), mask)
    assert (y1 - y0) > 150 and (x1 - x0) > 150  # the whole vertebra, not a fragment


def test_real_head_slice_boxes_the_skull_and_not_the_head_holder():
    import cv2

    hu = read_hu(get_testdata_file("693_UNCI.dcm"))  # a head slice resting in a curved head holder
    y0, y1, x0, x1 = otsu_crop_box(hu)
    n, labels, stats, _ = cv2.connectedComponentsWithStats((hu > -500).astype(np.uint8), connectivity=4)
    head = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    skull = (labels == head) & (hu > 600)
    assert _inside((y0, y1, x0, x1), skull)
    holder = (labels != head) & (labels > 0)
    in_box = holder[y0:y1, x0:x1].sum()
    assert holder.sum() > 1000 and in_box < 0.2 * holder.sum()


def test_blank_slice_gives_the_full_image():
    hu = np.full((64, 80), -1000.0, np.float32)
    assert otsu_crop_box(hu) == (0, 64, 0, 80)


def test_margin_is_five_percent_each_side(phantom):
    k = len(phantom.hu) // 2
    y0, y1, x0, x1 = otsu_crop_box(phantom.hu[k], margin=0.0)
    b = otsu_crop_box(phantom.hu[k], margin=0.05)
    assert b[0] == max(0, int(np.floor(y0 - 0.05 * (y1 - y0)))) and b[3] == min(
        128, int(np.ceil(x1 + 0.05 * (x1 - x0)))
    )


def test_preprocess_slice_shape_type_and_channels(phantom):
    k = len(phantom.hu) // 2
    out = preprocess_slice(phantom.hu[k], size=64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    box = otsu_crop_box(phantom.hu[k])
    y0, y1, x0, x1 = box
    crop = phantom.hu[k, y0:y1, x0:x1]
    # soft-tissue channel saturates on bone where the standard bone window does not
    assert out[..., 0].max() == 255 and out[..., 1].max() < 255
    full = preprocess_slice(crop, size=64, box=(0, crop.shape[0], 0, crop.shape[1]))
    np.testing.assert_array_equal(out, full)


def test_zero_padding_is_centred():
    hu = np.full((40, 20), 2000.0, np.float32)  # tall bright crop
    out = preprocess_slice(hu, size=40, box=(0, 40, 0, 20))
    assert out[:, :10].max() == 0 and out[:, -10:].max() == 0 and out[:, 10:30].min() == 255


def test_study_crop_is_steady_and_ignores_outliers(phantom):
    images, boxes = preprocess_study(phantom.hu, size=48, crop="study")
    assert images.shape == (len(phantom.hu), 48, 48, 3) and len(set(boxes)) == 1
    slice_images, slice_boxes = preprocess_study(phantom.hu[:5], size=48, crop="slice")
    assert slice_images.shape == (5, 48, 48, 3)
    np.testing.assert_array_equal(slice_images[2], preprocess_slice(phantom.hu[2], 48))
    per_slice = [(10, 50, 10, 50)] * 9 + [(0, 120, 0, 128)]  # one outlier (e.g. the skull)
    # 10th/90th percentiles: the outlier moves the box by a few pixels, where a union would take 120
    assert study_crop_box(per_slice, (128, 128)) == (9, 57, 9, 58)
    assert study_crop_box(per_slice + [(0, 128, 0, 128)] * 5, (128, 128)) == (9, 57, 9, 58)  # blanks ignored
    assert study_crop_box([(0, 128, 0, 128)] * 3, (128, 128)) == (0, 128, 0, 128)
    with pytest.raises(ValueError, match="crop"):
        preprocess_study(phantom.hu[:2], crop="volume")


def test_a_study_is_windowed_in_chunks_exactly_as_at_once():
    """No float copy of the whole study (367 MB at the real shape, in each of prepare's workers): the
    slices are windowed CHUNK at a time, and give what the whole volume at once gives."""
    from cspine.crops import bone_u8
    from cspine.preprocess import CHUNK, WINDOWS, _square_resize, _window_u8, windows_u8

    rng = np.random.default_rng(0)
    hu = rng.normal(0, 600, size=(CHUNK * 2 + 5, 40, 48)).astype(np.float32)
    images, boxes = preprocess_study(hu, 24)
    y0, y1, x0, x1 = boxes[0]
    expected = np.stack([_square_resize(c, 24) for c in windows_u8(hu[:, y0:y1, x0:x1])])
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(bone_u8(hu), _window_u8(hu, *WINDOWS[1][1:]))


def test_a_study_is_preprocessed_without_a_float_copy_of_it():
    """Found by the rehearsal at the real shape: each of prepare's 8 reading processes held float copies of
    the whole study (367 MB each at 512² × 350)."""
    import tracemalloc

    hu = np.random.default_rng(0).normal(0, 600, size=(200, 128, 128)).astype(np.float32)
    tracemalloc.start()
    preprocess_study(hu, 24)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.3 * hu.nbytes
