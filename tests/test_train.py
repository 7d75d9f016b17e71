"""Stage 1 training: falling loss, exact resume, worker reseeding, DDP parity, Grad-CAM."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from cspine.checkpoints import load_checkpoint, load_slice_model
from cspine.config import load_config
from cspine.data import SliceDataset, build_transforms, seed_worker
from cspine.runs import Run
from cspine.runtime import Runtime
from cspine.train_slices import train_fold

from .conftest import SMOKE_CONFIG


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, synthetic_root):
    """A run folder with the smoke cache and folds (no models)."""
    from cspine.pipeline import setup_run
    from cspine.prepare import prepare

    run_dir = tmp_path_factory.mktemp("prepared")
    cfg = load_config(SMOKE_CONFIG)
    setup_run(cfg, synthetic_root, run_dir)
    prepare(cfg, synthetic_root, run_dir / "cache")
    return run_dir


def _copy_base(prepared: Path, dest: Path) -> Path:
    dest.mkdir()
    source, run = Run(prepared), Run(dest)
    shutil.copytree(source.cache.root, run.cache.root)
    for src, dst in ((source.folds, run.folds), (source.labels, run.labels)):
        shutil.copy(src, dst)
    return dest


def test_training_lowers_the_loss(prepared, tmp_path):
    run_dir = _copy_base(prepared, tmp_path / "run")
    cfg = load_config(
        SMOKE_CONFIG,
        [
            "slice.epochs=6",
            "slice.steps_per_epoch=6",
            "slice.lr=0.003",
            "slice.patience=10",
            "slice.step_size=10",
        ],
    )
    train_fold(cfg, run_dir, 0)
    history = pd.read_csv(run_dir / "slice" / "fold0" / "history.csv")
    assert len(history) == 6
    assert history["train_loss"].iloc[-2:].mean() < history["train_loss"].iloc[:2].mean()
    for name in ("best.pt", "last.pt", "done", "oof_slices.csv", "table2.md", "train.log", "config.yaml"):
        assert (run_dir / "slice" / "fold0" / name).is_file(), name


def test_a_time_boxed_call_is_not_finished_until_the_last_epoch(prepared, tmp_path):
    run_dir = _copy_base(prepared, tmp_path / "boxed")
    cfg = load_config(SMOKE_CONFIG, ["slice.epochs=2", "slice.patience=10"])
    assert not train_fold(cfg, run_dir, 0, max_epochs=1)["finished"]
    assert not (run_dir / "slice" / "fold0" / "done").exists()
    assert train_fold(cfg, run_dir, 0)["finished"]


@pytest.mark.parametrize("select", ["val_loss", "last"])
def test_best_pt_holds_the_epoch_that_select_names(prepared, tmp_path, monkeypatch, select):
    # validation reads the CNN's outputs inverted at epochs 2 and 4, so those epochs' validation loss is
    # the worst: "val_loss" must keep epoch 1 and stop at epoch 2 (patience 1); "last" must train all 4
    # epochs and keep the fourth, whatever its loss
    from cspine import train_slices

    calls = []

    def inverted_at_even_epochs(*args, **kwargs):
        probs, targets, known = real_predict_loader(*args, **kwargs)
        calls.append(1)
        return (1 - probs if len(calls) % 2 == 0 else probs), targets, known

    real_predict_loader = train_slices.predict_loader
    monkeypatch.setattr(train_slices, "predict_loader", inverted_at_even_epochs)
    run_dir = _copy_base(prepared, tmp_path / select)
    cfg = load_config(SMOKE_CONFIG, ["slice.epochs=4", "slice.patience=1", f"slice.select={select}"])
    train_fold(cfg, run_dir, 0)
    out = run_dir / "slice" / "fold0"
    history = pd.read_csv(out / "history.csv")
    best = load_checkpoint(out / "best.pt", "slice-cnn")
    last = load_checkpoint(out / "last.pt", "slice-resume")
    same = all(torch.equal(best["model"][key], last["model"][key]) for key in last["model"])
    if select == "last":
        assert len(history) == 4 and best["meta"]["epoch"] == 4 and same
        assert history["val_loss"].iloc[-1] > history["val_loss"].min()
    else:
        assert len(history) == 2 and best["meta"]["epoch"] == 1 and not same
        assert best["meta"]["val_loss"] == pytest.approx(history["val_loss"].min())
    with pytest.raises(ValueError, match="slice.select"):
        bad = load_config(SMOKE_CONFIG, ["slice.select=lowest"])
        train_fold(bad, _copy_base(prepared, tmp_path / "bad"), 0)


def test_a_narrow_cnn_trains_and_loads_at_its_width(prepared, tmp_path):
    run_dir = _copy_base(prepared, tmp_path / "narrow")
    cfg = load_config(SMOKE_CONFIG, ["slice.backbone=resnet10t", "slice.width=0.25", "slice.epochs=1"])
    train_fold(cfg, run_dir, 0)
    # no config needed: the width is saved
    model, _ = load_slice_model(run_dir / "slice" / "fold0" / "best.pt")
    assert model.width == 0.25 and model.num_features == 128  # resnet10t's 512 at a quarter


@pytest.mark.parametrize("schedule", ["slice.schedule=step", "slice.schedule=cosine"])
def test_resumed_run_matches_an_uninterrupted_one(prepared, tmp_path, schedule):
    cfg = load_config(
        SMOKE_CONFIG, ["slice.epochs=3", "slice.patience=10", "slice.warmup_epochs=1", schedule]
    )
    straight = _copy_base(prepared, tmp_path / "straight")
    train_fold(cfg, straight, 1)
    resumed = _copy_base(prepared, tmp_path / "resumed")
    first = train_fold(cfg, resumed, 1, max_epochs=1)  # as if killed after epoch 1
    assert not first["finished"] and not (resumed / "slice" / "fold1" / "done").exists()
    second = train_fold(cfg, resumed, 1)
    assert second["finished"] and second["epochs"] == 3
    a = load_checkpoint(straight / "slice" / "fold1" / "last.pt", "slice-resume")
    b = load_checkpoint(resumed / "slice" / "fold1" / "last.pt", "slice-resume")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    assert [r["train_loss"] for r in a["history"]] == pytest.approx([r["train_loss"] for r in b["history"]])
    # schedule resumed
    assert [r["lr"] for r in a["history"]] == pytest.approx([r["lr"] for r in b["history"]])


def test_learning_rate_schedules():
    """ "step" is the paper's StepLR per epoch; "cosine" warms up from lr/100 to lr, then falls to min_lr."""
    from cspine.train_slices import learning_rate_schedule

    def rates(overrides, updates_per_epoch=5):
        s = load_config(None, ["slice.epochs=6", "slice.lr=0.01", *overrides]).slice
        optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=s.lr)
        scheduler = learning_rate_schedule(optimizer, s, updates_per_epoch)
        scheduler.step(0)
        scheduler.step_update(0)
        seen = []
        for epoch in range(s.epochs):
            for update in range(updates_per_epoch):
                seen.append(optimizer.param_groups[0]["lr"])
                scheduler.step_update(epoch * updates_per_epoch + update + 1)
            scheduler.step(epoch + 1)
        return np.array(seen).reshape(s.epochs, updates_per_epoch)

    step = rates(["slice.step_size=2", "slice.gamma=0.5"])
    assert np.allclose(step, np.repeat([0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025], 5).reshape(6, 5))
    cosine = rates(["slice.schedule=cosine", "slice.warmup_epochs=1", "slice.min_lr=1e-4"])
    assert cosine[0, 0] == pytest.approx(1e-4)  # warm-up starts at lr / 100
    assert cosine.max() == cosine[1, 0] > 0.009  # the peak comes after one epoch, on the cosine from lr
    assert np.all(np.diff(cosine.ravel()[5:]) < 0)  # then falls at every update
    assert 1e-4 < cosine[-1, -1] < 2e-4  # to about min_lr
    with pytest.raises(ValueError, match="slice.schedule"):
        rates(["slice.schedule=linear"])


def test_workers_draw_different_augmentations(prepared):
    cfg = load_config(SMOKE_CONFIG, ["slice.rotate=30"])
    index = pd.read_csv(prepared / "cache" / "index.csv", dtype={"StudyInstanceUID": str})
    one = index.iloc[[len(index) // 2] * 8]  # the same slice eight times: only augmentation differs
    dataset = SliceDataset(prepared / "cache", one, build_transforms(cfg.slice, True, 48, seed=0))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=1,
        num_workers=2,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(0),
    )
    images = [batch[0][0] for batch in loader]
    by_worker = [images[0::2], images[1::2]]  # workers alternate batches
    for a, b in zip(*by_worker):
        assert not torch.equal(a, b)  # without reseeding, albumentations repeats across workers
    unseeded = torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0)
    )
    repeats = [batch[0][0] for batch in unseeded]
    assert any(torch.equal(a, b) for a, b in zip(repeats[0::2], repeats[1::2]))  # the bug the reseeding fixes


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_parameters(prepared, tmp_path):
    run_dir = _copy_base(prepared, tmp_path / "ddp")
    # each rank trains; after every step DDP's all-reduce must leave the replicas equal. Compare rank 0's
    # checkpoint with a parameter dump from rank 1 taken through the same code path.
    mp.spawn(_ddp_check, args=(2, str(tmp_path / "init"), str(run_dir), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "params_rank0.pt")
    b = torch.load(tmp_path / "params_rank1.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    start = torch.load(tmp_path / "params_start.pt")
    assert any(not torch.equal(start[k], a[k]) for k in a)  # they trained


def _ddp_check(rank: int, world: int, init_file: str, run_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    import cspine.training as ts

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = load_config(SMOKE_CONFIG, ["slice.epochs=1", "slice.steps_per_epoch=4", "slice.dropout=0.0"])
    rt = Runtime(torch.device("cpu"), rank=rank, world_size=world)
    captured = {}
    original = ts.DistributedDataParallel

    def wrap(model, **kwargs):
        if rank == 0:
            torch.save(
                {k: v.detach().clone() for k, v in model.named_parameters()},
                Path(out_dir) / "params_start.pt",
            )
        captured["model"] = model
        return original(model, **kwargs)

    ts.DistributedDataParallel = wrap
    try:
        train_fold(cfg, run_dir, 0, rt=rt, max_steps=4)
    finally:
        ts.DistributedDataParallel = original
    # parameters, not buffers: BatchNorm statistics are each rank's own until DDP re-broadcasts rank 0's
    torch.save(
        {k: v.detach().clone() for k, v in captured["model"].named_parameters()},
        Path(out_dir) / f"params_rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


def test_grad_cam_map_has_the_slice_size(prepared):
    from cspine.cache import load_study_images
    from cspine.explain import grad_cam, save_cam_figure
    from cspine.models import SliceNet

    index = pd.read_csv(prepared / "cache" / "index.csv", dtype={"StudyInstanceUID": str})
    image = np.asarray(load_study_images(prepared / "cache", index["StudyInstanceUID"].iloc[0])[5])
    heat = grad_cam(SliceNet("test_resnet"), image)
    assert heat.shape == image.shape[:2] and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0
    path = save_cam_figure(image, heat, prepared / "cam.png", boxes=[(5, 5, 10, 10)])
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("balanced", [True, False])
def test_sampler_draws_the_asked_number_and_shards_across_ranks(balanced):
    from cspine.data import BalancedDistributedSampler

    labels = np.array([1] * 5 + [0] * 95)
    dataset = list(range(100))
    shards = []
    for rank in range(2):
        sampler = BalancedDistributedSampler(
            dataset, labels if balanced else None, 40, num_replicas=2, rank=rank, seed=3
        )
        sampler.set_epoch(1)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == 20
    together = np.array(shards[0] + shards[1])
    if balanced:
        assert (labels[together] == 1).sum() == 20  # half positives, though they are 5% of the data
    sampler.set_epoch(2)
    assert list(sampler) != shards[1]
    quarter = BalancedDistributedSampler(dataset, labels, 40, seed=3, positive_fraction=0.25)
    assert (labels[list(quarter)] == 1).sum() == 10


def test_dataset_keeps_a_bounded_number_of_studies_open(prepared, monkeypatch):
    import cspine.data as data

    monkeypatch.setattr(data, "OPEN_STUDIES", 2)
    index = pd.read_csv(prepared / "cache" / "index.csv", dtype={"StudyInstanceUID": str})
    firsts = index.groupby("StudyInstanceUID").head(1)
    dataset = SliceDataset(
        prepared / "cache", firsts, build_transforms(load_config(SMOKE_CONFIG).slice, False, 48)
    )
    images = [dataset.image(i) for i in range(len(firsts))]
    assert len(dataset._studies) == 2 and len(firsts) > 2
    np.testing.assert_array_equal(dataset.image(0), images[0])  # evicted studies reopen transparently


def test_height_matched_negatives_follow_the_positives_heights():
    from cspine.data import BalancedDistributedSampler, height_matched_weights

    rows = []
    for s in range(20):  # 50-slice studies; fractures only in the top fifth (like C2)
        for k in range(50):
            rows.append({"StudyInstanceUID": f"s{s}", "order": k, "label": int(s < 10 and 3 <= k < 8)})
    index = pd.DataFrame(rows)
    labels = index["label"].to_numpy()
    weights = height_matched_weights(index, bins=10)
    assert (weights[labels == 1] == 0).all()
    assert weights[(labels == 0) & (index["order"] >= 10)].max() == 0  # no positive lies below the top fifth

    height = index["order"].to_numpy()
    matched = BalancedDistributedSampler(
        list(range(len(index))),
        labels,
        400,
        seed=0,
        positive_fraction=0.25,
        negative_weights=weights,
        matched_fraction=1.0,
    )
    uniform = BalancedDistributedSampler(list(range(len(index))), labels, 400, seed=0, positive_fraction=0.25)
    neg_matched = [i for i in matched if labels[i] == 0]
    neg_uniform = [i for i in uniform if labels[i] == 0]
    assert height[neg_matched].max() < 10  # every negative drawn where the positives are
    assert height[neg_uniform].mean() > 20  # uniform negatives spread over the whole study
    half = BalancedDistributedSampler(
        list(range(len(index))),
        labels,
        400,
        seed=0,
        positive_fraction=0.25,
        negative_weights=weights,
        matched_fraction=0.5,
    )
    share = np.mean(height[[i for i in half if labels[i] == 0]] < 10)
    assert 0.5 <= share < 0.7  # half matched, plus the uniform half's own top fifth


def test_box_maps_follow_the_image_through_augmentation(prepared):
    from cspine.cache import read_meta
    from cspine.config import SliceConfig

    index = pd.read_csv(prepared / "cache" / "index.csv", dtype={"StudyInstanceUID": str})
    boxed = [u for u in index["StudyInstanceUID"].unique() if read_meta(prepared / "cache", u)["boxes"]]
    assert boxed
    meta = read_meta(prepared / "cache", boxed[0])
    order, x0, y0, x1, y1 = meta["boxes"][0]
    assert meta["label"][order] == 1 and 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
    rows = index[(index["StudyInstanceUID"] == boxed[0]) & (index["order"].isin([order, 0]))]
    flip = SliceConfig(hflip=1.0, rotate=0.0)
    plain = SliceDataset(prepared / "cache", rows, build_transforms(flip, False, 48), with_boxes=True)
    flipped = SliceDataset(
        prepared / "cache", rows, build_transforms(flip, True, 48, seed=0), with_boxes=True
    )
    k = int(np.flatnonzero(rows["order"].to_numpy() == order)[0])
    image, _, _, boxes = plain[k]
    image_f, _, _, boxes_f = flipped[k]
    torch.testing.assert_close(image_f, image.flip(-1))
    torch.testing.assert_close(boxes_f, boxes.flip(-1))
    cols = torch.nonzero(boxes.sum(0)).flatten()
    assert cols.min() == int(x0) and cols.max() == int(np.ceil(x1)) - 1
    healthy = plain[1 - k][3]
    assert healthy.sum() == 0 and healthy.min() == 0  # a labelled slice without boxes: known, all background
    unknown = SliceDataset(
        prepared / "cache", rows.assign(label=-1), build_transforms(flip, False, 48), with_boxes=True
    )
    assert (unknown[k][3] == -1).all()  # no label: the box loss skips the slice


def test_box_loss_skips_unknown_slices_and_learns_where():
    from cspine.train_slices import box_loss

    boxes = torch.zeros(3, 32, 32)
    boxes[0, 0:8, 0:8] = 1  # top-left cell of a 2×2 map
    boxes[2] = -1  # unknown
    right = torch.full((3, 1, 2, 2), -6.0)
    right[0, 0, 0, 0] = 6.0
    wrong = right.clone()
    wrong[2] = 6.0  # the unknown slice may say anything
    torch.testing.assert_close(box_loss(right, boxes), box_loss(wrong, boxes))
    assert box_loss(right, boxes) < 0.01 < box_loss(-right, boxes)


def test_training_with_box_head_saves_a_loadable_model(prepared, tmp_path, monkeypatch):
    import cspine.train_slices as train_slices

    seen = []
    real_box_loss = train_slices.box_loss

    def recording_box_loss(box_logits, boxes):
        seen.append(boxes.clone())
        return real_box_loss(box_logits, boxes)

    monkeypatch.setattr(train_slices, "box_loss", recording_box_loss)
    run_dir = _copy_base(prepared, tmp_path / "run")
    cfg = load_config(SMOKE_CONFIG, ["slice.box_weight=1.0", "slice.height_matched=0.5", "slice.workers=0"])
    summary = train_fold(cfg, run_dir, 0, max_steps=2)
    assert len(seen) == 2  # the box loss is part of every training step
    boxes = torch.cat(seen)
    # real box maps (the smoke data has boxes), not all unknown
    assert (boxes == 1).any() and (boxes == 0).any()
    model, _ = load_slice_model(Path(summary["dir"]) / "best.pt")
    assert model.box_head is not None
    logits, box_logits = model(torch.zeros(2, 3, 48, 48), with_boxes=True)
    assert logits.shape == (2, 15) and box_logits.shape == (2, 1, 3, 3)


def test_training_and_extraction_feed_a_context_cnn_the_same_stack(prepared, tmp_path):
    from cspine.cache import load_study_images
    from cspine.features import study_features
    from cspine.inputs import slice_stack, to_tensor

    cfg = load_config(SMOKE_CONFIG, ["slice.context=1", "slice.workers=0"])
    index = pd.read_csv(prepared / "cache" / "index.csv", dtype={"StudyInstanceUID": str})
    uid = index["StudyInstanceUID"].iloc[0]
    rows = index[index["StudyInstanceUID"] == uid].sort_values("order").iloc[[0, 5]]
    dataset = SliceDataset(prepared / "cache", rows, build_transforms(cfg.slice, False, 48), context=1)
    single = SliceDataset(prepared / "cache", rows, build_transforms(cfg.slice, False, 48))
    study = load_study_images(prepared / "cache", uid)
    for i, order in enumerate(rows["order"]):
        image = dataset[i][0]
        assert image.shape == (9, 48, 48)
        expected = to_tensor(slice_stack(study, np.array([order]), 1), 48, torch.device("cpu"), False)[0]
        assert torch.allclose(image, expected, atol=1e-5)  # the CNN sees at inference what it trained on
        assert torch.equal(image[3:6], single[i][0])  # its middle three channels are the slice itself

    summary = train_fold(cfg, _copy_base(prepared, tmp_path / "run"), 0, max_steps=2)
    model, _ = load_slice_model(Path(summary["dir"]) / "best.pt")
    assert model.context == 1
    feats, probs = study_features(model, study, 48, torch.device("cpu"), batch_size=4)
    assert feats.shape[0] == probs.shape[0] == len(study)
    with torch.inference_mode():  # extraction scores each slice as the CNN saw it in training
        trained_view = torch.sigmoid(model(torch.stack([dataset[i][0] for i in range(len(rows))]))).numpy()
    np.testing.assert_allclose(probs[rows["order"].to_numpy()].astype(np.float32), trained_view, atol=2e-3)


def test_tta_averages_each_slice_with_its_mirror_image(prepared):
    from cspine.cache import load_study_images
    from cspine.features import study_features
    from cspine.models import SliceNet

    index = pd.read_csv(prepared / "cache" / "index.csv", dtype={"StudyInstanceUID": str})
    study = load_study_images(prepared / "cache", index["StudyInstanceUID"].iloc[0])[:6]
    torch.manual_seed(0)
    model = SliceNet("resnet10t", dropout=0.0).eval()
    cpu = torch.device("cpu")
    plain_f, plain_p = study_features(model, study, 48, cpu, batch_size=4)
    mirror_f, mirror_p = study_features(model, study[:, :, ::-1], 48, cpu, batch_size=4)
    tta_f, tta_p = study_features(model, study, 48, cpu, batch_size=4, tta=True)

    def logit(p):
        p = np.clip(p.astype(np.float64), 1e-4, 1 - 1e-4)
        return np.log(p / (1 - p))

    assert not np.allclose(plain_p, mirror_p, atol=1e-3)  # the readings differ: the average is a real test
    np.testing.assert_allclose(logit(tta_p), (logit(plain_p) + logit(mirror_p)) / 2, atol=2e-2)
    mean_f = (plain_f.astype(np.float32) + mirror_f) / 2
    np.testing.assert_allclose(tta_f.astype(np.float32), mean_f, atol=1e-2)


def test_a_fold_resumes_only_with_the_settings_it_began_with(prepared, tmp_path):
    from cspine.config import ConfigError

    run_dir = _copy_base(prepared, tmp_path / "resume")
    cfg = load_config(SMOKE_CONFIG, ["slice.epochs=2"])
    train_fold(cfg, run_dir, 0, max_epochs=1)
    with pytest.raises(
        ConfigError, match=r"fold 0 of .* made with other settings: slice.lr=0.01 \(made with 0.001\)"
    ):
        train_fold(load_config(SMOKE_CONFIG, ["slice.epochs=2", "slice.lr=0.01"]), run_dir, 0)
    assert train_fold(load_config(SMOKE_CONFIG, ["slice.epochs=2", "slice.workers=0"]), run_dir, 0)[
        "finished"
    ]
