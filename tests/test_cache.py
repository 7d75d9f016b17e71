"""The slice cache's two formats: plain .npy and compressed zarr hold the same slices; zarr is smaller."""

from __future__ import annotations

import numpy as np
import pytest

from cspine.cache import cache_bytes, is_cached, load_study_images, write_study_images
from cspine.config import ConfigError, load_config
from cspine.dicom import read_hu
from cspine.inputs import slice_stack
from cspine.prepare import prepare
from cspine.preprocess import preprocess_slice
from cspine.runs import Cache

from .conftest import SMOKE_CONFIG

REAL_SLICES = ["CTImage.dcm", "CT1_J2KR", "CT2_J2KR"]  # a chest slice and two NEMA CT slices, 512²


@pytest.fixture(scope="module")
def both_caches(synthetic_root, tmp_path_factory):
    """The same three studies cached as .npy and as zarr."""
    root = tmp_path_factory.mktemp("caches")
    uids = sorted(p.name for p in (synthetic_root / "train_images").iterdir())[:3]
    out = {}
    for fmt in ("npy", "zarr"):
        cfg = load_config(SMOKE_CONFIG, [f"prepare.format={fmt}"])
        out[fmt] = (root / fmt, prepare(cfg, synthetic_root, root / fmt, studies=uids))
    return uids, out


def test_zarr_and_npy_caches_hold_identical_slices_and_index(both_caches):
    uids, caches = both_caches
    (npy_dir, npy_index), (zarr_dir, zarr_index) = caches["npy"], caches["zarr"]
    assert npy_index.equals(zarr_index) and set(npy_index["StudyInstanceUID"]) == set(uids)
    for uid in uids:
        assert Cache(zarr_dir).zarr(uid).is_dir() and not Cache(zarr_dir).images(uid).exists()
        assert np.array_equal(np.asarray(load_study_images(zarr_dir, uid)), load_study_images(npy_dir, uid))
    assert cache_bytes(zarr_dir, uids) < cache_bytes(npy_dir, uids)


def test_a_zarr_study_reads_like_a_memory_map(both_caches):
    uids, caches = both_caches
    lazy = load_study_images(caches["zarr"][0], uids[0])
    mapped = load_study_images(caches["npy"][0], uids[0])
    assert len(lazy) == len(mapped) and lazy.shape == mapped.shape
    last = len(mapped) - 1
    assert np.array_equal(lazy[3], mapped[3]) and np.array_equal(lazy[2:5], mapped[2:5])
    orders = np.array([last, 0, 0, 4])
    assert np.array_equal(lazy[orders], mapped[orders])
    assert np.array_equal(slice_stack(lazy, orders, context=2), slice_stack(mapped, orders, context=2))
    assert isinstance(load_study_images(caches["zarr"][0], uids[0], mmap=False), np.ndarray)


def test_a_zarr_study_read_by_slice_numbers_never_asks_zarr_for_an_integer_array(both_caches):
    """zarr's own integer-array indexing decodes far more than it returns (1.6 s for a batch of 32 slices of
    a real-shaped study, 0.02 s for their range): a batch, a slice with its neighbours, or scattered slices
    are read as ranges or one by one, and give what a memory map gives."""
    uids, caches = both_caches
    lazy = load_study_images(caches["zarr"][0], uids[0])
    mapped = load_study_images(caches["npy"][0], uids[0])
    keys = []
    array = lazy._array

    class Spy:
        def __getitem__(self, key):
            keys.append(key)
            return array[key]

    lazy._array = Spy()
    n = len(mapped)
    for orders in (np.arange(n), np.array([n - 1, 0]), np.array([-1, -2]), [2, 3, 4], np.array([], int)):
        np.testing.assert_array_equal(lazy[orders], mapped[orders])
    assert keys and not any(isinstance(k, (list, np.ndarray)) for k in keys)


def test_real_ct_slices_compress_at_least_twofold(transfer_syntax_dir, tmp_path):
    images = np.stack([preprocess_slice(read_hu(transfer_syntax_dir / name), 384) for name in REAL_SLICES])
    cache = Cache(tmp_path)
    write_study_images(cache, "real", images, "zarr")
    stored = cache_bytes(tmp_path, ["real"])
    assert images.nbytes / stored >= 2.0  # measured 2.7x (benchmarks/bench_cache.py)
    assert np.array_equal(np.asarray(load_study_images(tmp_path, "real")), images)


def test_a_zarr_write_that_dies_leaves_no_store_and_a_stale_one_is_replaced(tmp_path, monkeypatch):
    import zarr

    cache = Cache(tmp_path)
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    cache.meta("s").write_text("{}")  # the JSON of a study whose store a crash removed
    real_create = zarr.create_array

    def dies_writing(*args, **kwargs):
        array = real_create(*args, **kwargs)

        class Dying:
            def __setitem__(self, key, value):
                array[:1] = value[:1]  # part of the study reaches the disk, then the process dies
                raise KeyboardInterrupt

        return Dying()

    monkeypatch.setattr(zarr, "create_array", dies_writing)
    with pytest.raises(KeyboardInterrupt):
        write_study_images(cache, "s", images, "zarr")
    assert not cache.zarr("s").exists() and not list(tmp_path.glob("*.part"))
    assert not is_cached(tmp_path, "s")

    monkeypatch.setattr(zarr, "create_array", real_create)
    write_study_images(cache, "s", images[:2], "zarr")  # a store left before its JSON: written over
    write_study_images(cache, "s", images, "zarr")
    assert np.array_equal(np.asarray(load_study_images(tmp_path, "s")), images) and is_cached(tmp_path, "s")


def test_an_unknown_cache_format_is_refused_by_its_key(synthetic_root, tmp_path):
    cfg = load_config(SMOKE_CONFIG, ["prepare.format=hdf5"])
    with pytest.raises(ConfigError, match="prepare.format: 'hdf5' is not one of npy, zarr"):
        prepare(cfg, synthetic_root, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_the_training_loader_reads_the_same_items_from_either_format(both_caches):
    import torch

    from cspine.data import SliceDataset, build_transforms

    _, caches = both_caches
    cfg = load_config(SMOKE_CONFIG)
    transform = build_transforms(cfg.slice, train=False, size=cfg.prepare.size)
    index = caches["npy"][1]
    npy, zarr = (
        SliceDataset(caches[fmt][0], index, transform, with_boxes=True, context=1) for fmt in ("npy", "zarr")
    )
    loader = torch.utils.data.DataLoader(zarr, batch_size=4, num_workers=2, sampler=[0, len(index) - 1, 7, 3])
    batch = next(iter(loader))
    for got, want in zip(
        batch, torch.utils.data.default_collate([npy[i] for i in (0, len(index) - 1, 7, 3)])
    ):
        assert torch.equal(got, want)


def test_a_damaged_zarr_shard_is_named_when_it_is_read(tmp_path):
    from cspine.cache import CacheError, write_study_images

    cache = Cache(tmp_path / "cache")
    images = np.random.default_rng(0).integers(0, 255, size=(4, 16, 16, 3), dtype=np.uint8)
    write_study_images(cache, "1.2.3", images, "zarr")
    shards = [p for p in cache.zarr("1.2.3").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert shards
    for shard in shards:  # a disk error, or a copy cut short
        shard.write_bytes(shard.read_bytes()[:40] + b"\0" * 200)
    with pytest.raises(CacheError, match=r"1\.2\.3\.zarr: the cached study cannot be read.*1\.2\.3\.json"):
        np.asarray(load_study_images(cache.root, "1.2.3"))


def test_a_truncated_npy_study_is_named_when_it_is_read(both_caches, tmp_path):
    """Read by `train-slices` directly, a truncated .npy gave numpy's "mmap length is greater than file
    size", naming no file."""
    import shutil

    from cspine.cache import CacheError

    uids, caches = both_caches
    cache = tmp_path / "cache"
    shutil.copytree(caches["npy"][0], cache)
    path = Cache(cache).images(uids[0])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for mmap in (True, False):
        with pytest.raises(
            CacheError, match=rf"{path.name}: the cached study cannot be read.*run prepare again"
        ):
            load_study_images(cache, uids[0], mmap=mmap)
