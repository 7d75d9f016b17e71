"""cspine.models: shapes, features, offline pretrained weights, and packed-sequence correctness."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from sklearn.metrics import roc_auc_score

from cspine.inputs import SLICE_OUTPUTS
from cspine.models import CropNet, SequenceNet, SliceNet, create_backbone


def test_slice_net_logits_and_features():
    model = SliceNet("test_resnet", dropout=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, len(SLICE_OUTPUTS)) == (2, 15)
    features = model.features(x)
    assert features.shape == (2, model.num_features)
    f, l2 = model.features_and_logits(x)
    torch.testing.assert_close(l2, logits)
    torch.testing.assert_close(f, features)


def test_resnet50_features_are_2048():
    assert SliceNet("resnet50").num_features == 2048


def test_width_scales_a_resnets_stages_and_deep_stem():
    full, half = SliceNet("resnet10t"), SliceNet("resnet10t", width=0.5)
    assert [i["num_chs"] for i in full.backbone.feature_info] == [64, 64, 128, 256, 512]
    assert [i["num_chs"] for i in half.backbone.feature_info] == [32, 32, 64, 128, 256]
    assert half.num_features == 256 and half.head.in_features == 256
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 0.2 < count(half) / count(full) < 0.3  # convolutions scale with width squared
    bottleneck = SliceNet("resnet26", width=0.5)  # stage widths are given before the bottleneck's 4x
    assert [i["num_chs"] for i in bottleneck.backbone.feature_info][1:] == [128, 256, 512, 1024]
    assert half(torch.randn(2, 3, 64, 64)).shape == (2, len(SLICE_OUTPUTS))


def test_width_refuses_what_it_cannot_scale(tmp_path):
    with pytest.raises(ValueError, match="ResNets only.*lcnet_050"):
        SliceNet("lcnet_050", width=0.5)
    weights = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), weights)
    with pytest.raises(ValueError, match="own width"):
        create_backbone("resnet10t", weights, width=0.5)


@pytest.mark.parametrize("backbone", ["mobilenetv3_small_050", "lcnet_050"])
def test_backbones_with_a_head_convolution_feed_the_heads(backbone):
    # their pooled vector is wider than the last stage (num_features); the heads must take that width
    model = SliceNet(backbone, dropout=0.0, box_head=True).eval()
    x = torch.randn(2, 3, 64, 64)
    f, logits = model.features_and_logits(x)
    assert f.shape == (2, model.num_features) and model.num_features > model.backbone.num_features
    logits_with_boxes, _ = model(x, with_boxes=True)
    torch.testing.assert_close(logits_with_boxes, logits)


def test_pretrained_weights_come_from_a_local_file_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = timm.create_model("test_resnet", num_classes=0)
    torch.nn.init.constant_(
        source.conv1[0].weight if isinstance(source.conv1, torch.nn.Sequential) else source.conv1.weight,
        0.123,
    )
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone("test_resnet", pretrained_file=path)
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    random_init = create_backbone("test_resnet")
    assert not all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), random_init.state_dict().values())
    )
    with pytest.raises(FileNotFoundError, match="never downloads"):
        SliceNet("test_resnet", pretrained_file=str(tmp_path / "missing.pth"))


def test_pretrained_cnns_normalise_their_input_as_their_weights_expect_and_keep_it_in_the_checkpoint(
    tmp_path, monkeypatch
):
    """A ResNet-50 file saved as timm saves ImageNet weights: the slice CNN and the crop model both read it,
    both normalise with ImageNet's mean and std (the crop model's six channels cycle through R, G, B as
    timm repeats the RGB filters), and a model rebuilt from its checkpoint normalises the same way."""
    from cspine.checkpoints import CropMeta, SliceMeta, load_crop_model, load_slice_model, save_model
    from cspine.crops import crop_spec
    from cspine.inputs import SliceReading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = timm.create_model("resnet50", num_classes=0)
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    x = torch.rand(2, 3, 64, 64)
    net = SliceNet("resnet50", pretrained_file=str(path), dropout=0.0).eval()
    torch.testing.assert_close(net.arch["norm"], imagenet)
    mean, std = (
        torch.tensor(imagenet["mean"]).view(1, 3, 1, 1),
        torch.tensor(imagenet["std"]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), source.eval()((x - mean) / std))
    save_model(
        net, tmp_path / "slice.pt", SliceMeta(SliceReading(64, "study", 0.05, 64, 0), 0, 1, 0.5, [], {})
    )
    rebuilt, _ = load_slice_model(tmp_path / "slice.pt")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.features(x), net.features(x))

    crop = CropNet("resnet50", in_chans=6, hidden=8, pretrained_file=str(path))
    cycled = torch.tensor(imagenet["mean"] * 2).view(1, 6, 1, 1)
    torch.testing.assert_close(crop.norm.mean, cycled)
    # timm's own repetition of the RGB filters over six channels, scaled by 3/6
    torch.testing.assert_close(crop.cnn.conv1.weight, source.conv1.weight.repeat(1, 2, 1, 1) / 2)
    save_model(crop, tmp_path / "crop.pt", CropMeta(crop_spec(64, 4, 2, 0.1), 0, []))
    torch.testing.assert_close(load_crop_model(tmp_path / "crop.pt")[0].norm.mean, cycled)

    scratch = SliceNet("resnet50")  # from scratch: the one fixed normalisation the kit always used
    assert scratch.arch["norm"] == {"mean": [0.5], "std": [0.25]}
    with torch.no_grad():
        torch.testing.assert_close(scratch.norm(x), (x - 0.5) / 0.25)


def test_blstm_padded_batch_equals_each_sequence_alone():
    torch.manual_seed(0)
    model = SequenceNet(in_features=12, hidden=16, dropout=0.0).eval()
    lengths = [7, 3, 11]
    seqs = [torch.randn(n, 12) for n in lengths]
    batch = torch.zeros(3, 11, 12)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    batch[1, 3:] = 99.0  # padding content must not matter
    together = model(batch, torch.tensor(lengths))
    for i, s in enumerate(seqs):
        alone = model(s[None], torch.tensor([len(s)]))
        torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-5)
    assert together.shape == (3, 8)


def test_blstm_learns_separable_studies():
    from cspine.config import SeqConfig
    from cspine.train_seq import Study, fit_sequence_model, score_studies

    rng = np.random.default_rng(0)

    def study(i, positive):
        x = rng.normal(size=(int(rng.integers(20, 40)), 8)).astype(np.float32)
        if positive:  # a few "fractured" slices carry a signal in feature 0
            at = rng.integers(0, len(x) - 3)
            x[at : at + 3, 0] += 4.0
        y = np.zeros(8, np.float32)
        y[0] = y[3] = float(positive)
        return Study(f"s{i}", x, y)

    train = [study(i, i % 2 == 0) for i in range(60)]
    stop = [study(200 + i, i % 2 == 0) for i in range(10)]
    test = [study(100 + i, i % 2 == 0) for i in range(20)]
    cfg = SeqConfig(epochs=40, batch_size=8, lr=3e-3, patience=40, dropout=0.0)
    model, history = fit_sequence_model(train, stop, cfg, hidden=16, device=torch.device("cpu"), seed=0)
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    p = score_studies(model, test, torch.device("cpu"))
    y = np.array([v.y[0] for v in test])
    assert roc_auc_score(y, p[:, 0]) >= 0.95
    assert np.mean((p[:, 0] > 0.5) == y) >= 0.9


def test_box_head_maps_the_second_to_last_stage_and_keeps_the_logits():
    torch.manual_seed(0)
    model = SliceNet("test_resnet", dropout=0.0, box_head=True).eval()
    x = torch.randn(2, 3, 64, 64)
    logits, box_logits = model(x, with_boxes=True)
    assert box_logits.shape == (2, 1, 4, 4)  # stride 16
    torch.testing.assert_close(logits, model(x))
    with pytest.raises(ValueError, match="no box head"):
        SliceNet("test_resnet")(x, with_boxes=True)


def test_early_stopping_studies_come_from_training_studies_only():
    from cspine.train_seq import Study, split_for_stopping

    studies = [
        Study(f"s{i}", np.zeros((4, 2), np.float32), np.array([i % 2] + [0] * 7, np.float32))
        for i in range(20)
    ]
    fit, stop = split_for_stopping(studies, 0.2, seed=0)
    assert len(stop) == 4 and len(fit) == 16
    assert not {s.uid for s in fit} & {s.uid for s in stop}
    assert sum(s.y[0] for s in stop) == 2  # stratified by case label
    assert split_for_stopping(studies, 0.0, seed=0) == (studies, [])
    assert split_for_stopping(studies[:3], 0.2, seed=0) == (studies[:3], [])  # too few to hold any back


def test_slice_stack_puts_each_slice_between_its_neighbours():
    from cspine.inputs import slice_stack
    from cspine.models import in_channels

    study = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 2, 3), np.uint8)  # slice k = k
    middle = slice_stack(study, np.array([2]), context=1)[0]
    assert middle.shape == (2, 2, in_channels(1)) == (2, 2, 9)
    assert middle[0, 0].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # head to feet, three windows per slice
    ends = slice_stack(study, np.array([0, 4]), context=2)
    assert ends[0, 0, 0].tolist() == [0] * 9 + [1] * 3 + [2] * 3  # the first slice repeats above the study
    assert ends[1, 0, 0].tolist() == [2] * 3 + [3] * 3 + [4] * 9
    assert np.array_equal(slice_stack(study, np.array([3]), context=0), study[[3]])  # the paper's one slice


def test_context_net_takes_the_stacked_channels():
    model = SliceNet("test_resnet", dropout=0.0, context=1).eval()
    assert model.forward(torch.zeros(2, 9, 48, 48)).shape == (2, len(SLICE_OUTPUTS))
    with pytest.raises(RuntimeError):
        model(torch.zeros(2, 3, 48, 48))  # a single slice is not what it was built for


def test_bin_slices_keeps_each_runs_peak_and_stretches_short_studies():
    from cspine.inputs import bin_slices, study_input

    x = np.zeros((100, 2), np.float32)
    x[7, 0], x[93, 1] = 5.0, -1.0  # one-slice evidence near each end
    pooled = bin_slices(x, 10)
    assert pooled.shape == (10, 2)
    assert pooled[0, 0] == 5.0 and pooled[1:, 0].max() == 0.0  # the peak survives, in the first tenth
    assert pooled[9, 1] == 0.0  # a maximum: the -1 is not the largest value in its run
    short = bin_slices(np.arange(4, dtype=np.float32)[:, None], 8)
    assert short[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert bin_slices(x, 0) is x  # 0 leaves whole studies
    probs = np.full((30, 15), 0.5, np.float16)
    probs[3, 0] = 0.99
    logits = study_input(None, probs, "fracture", bins=6)
    assert logits.shape == (6, 1) and logits[0, 0] == pytest.approx(np.log(0.99 / 0.01), rel=1e-2)
    assert np.allclose(logits[1:], 0.0)
