"""The networks: `SliceNet` (a timm CNN on one slice), `SequenceNet` (a BLSTM over a study) and `CropNet`
(a timm CNN on each crop slice of one vertebra, then a BiGRU over its slices).

Both return logits and nothing else; losses live in the training modules, so inference, Grad-CAM and
tests call the models without labels.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cspine import TARGETS, VERTEBRAE
from cspine.inputs import MEAN, SLICE_OUTPUTS, STD

WINDOWS = 3  # CT windows per slice, stacked as channels (the paper's input)


def in_channels(context: int) -> int:
    """Input channels of a CNN that sees each slice with ``context`` neighbours on each side."""
    return WINDOWS * (2 * context + 1)


def width_args(name: str, width: float) -> dict:
    """timm arguments that scale a ResNet's channels by ``width``: its four stages, and its stem if deep.

    Half the width is about a quarter of the arithmetic: on a 2-core CPU, resnet10t at 0.5 trains 2.3×
    as many 64 px slices a second, so a from-scratch CNN gets twice the epochs in the same minutes.
    """
    if width == 1.0:
        return {}
    if width <= 0:
        raise ValueError(f"slice.width must be positive, got {width}")
    reference = timm.create_model(name, pretrained=False, num_classes=0)
    if not isinstance(reference, timm.models.ResNet):
        raise ValueError(f"slice.width scales timm ResNets only; {name} is a {type(reference).__name__}")
    expansion = reference.layer1[0].expansion  # stage widths are given before a bottleneck's expansion
    args = {
        "channels": tuple(
            max(8, round(info["num_chs"] / expansion * width)) for info in reference.feature_info[1:]
        )
    }
    if isinstance(reference.conv1, nn.Sequential):  # a deep stem ends at 2·stem_width channels
        args["stem_width"] = max(8, round(reference.feature_info[0]["num_chs"] / 2 * width))
    return args


UNIFORM_NORM = {"mean": (MEAN,), "std": (STD,)}  # a network trained from scratch: one mean and std


def weights_norm(backbone: nn.Module) -> dict:
    """The input mean and std (per RGB channel, of images in [0, 1]) that a timm backbone's pretrained
    weights were trained with: ImageNet's for torchvision's and timm's ResNets (``pretrained_cfg``)."""
    cfg = backbone.pretrained_cfg
    return {"mean": tuple(float(v) for v in cfg["mean"]), "std": tuple(float(v) for v in cfg["std"])}


class InputNorm(nn.Module):
    """(x − mean) / std per channel, for images in [0, 1]: the normalisation a network's weights expect.

    ``norm`` gives one mean and std per RGB channel (or one for all); with more channels than that, they
    repeat in turn, as timm repeats the first convolution's RGB filters over extra input channels
    (`timm.models.adapt_input_conv`): channel c meets the filters of RGB channel c mod 3, and so that
    channel's statistics. Buffers, not parameters, and not saved: the checkpoint's ``arch`` holds ``norm``.
    """

    def __init__(self, channels: int, norm: dict):
        super().__init__()
        mean, std = norm["mean"], norm["std"]
        self.register_buffer(
            "mean", torch.tensor([mean[c % len(mean)] for c in range(channels)]).view(1, -1, 1, 1), False
        )
        self.register_buffer(
            "std", torch.tensor([std[c % len(std)] for c in range(channels)]).view(1, -1, 1, 1), False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def create_backbone(
    name: str, pretrained_file: str | os.PathLike = "", in_chans: int = 3, width: float = 1.0
) -> nn.Module:
    """A timm backbone without classifier (pooled features out); weights only from a local file.

    Args:
        name: timm model name (e.g. "resnet50", "resnet10t", "test_resnet").
        pretrained_file: a local ``.pth``/``.bin``/``.safetensors`` with the model's weights; "" leaves the
            network randomly initialised (the paper trains from scratch). Nothing is ever downloaded.
        in_chans: input channels (3: the paper's three windows).
        width: channel multiplier for timm ResNets (`width_args`); 1 is the model as published.

    Raises:
        FileNotFoundError: the named weights file does not exist.
        ValueError: ``width`` is not 1 for a model that is not a ResNet, or with pretrained weights.
    """
    if pretrained_file:
        if width != 1.0:
            raise ValueError(f"pretrained weights fit {name} at its own width, not slice.width={width}")
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained weights {path} not found: cspine never downloads weights; "
                "name a local file (slice.pretrained_file=...) or leave it empty"
            )
        return timm.create_model(
            name,
            pretrained=True,
            num_classes=0,
            in_chans=in_chans,
            pretrained_cfg_overlay=dict(file=str(path)),
        )
    return timm.create_model(
        name, pretrained=False, num_classes=0, in_chans=in_chans, **width_args(name, width)
    )


class SliceNet(nn.Module):
    """A slice classifier: timm backbone → pooled features → dropout → one linear head per output.

    ``forward`` gives logits [B, 15] in `SLICE_OUTPUTS` order; ``features`` gives the pooled vector
    [B, D] (2,048 for ResNet-50) that stage 2 reads. With ``box_head``, a 1×1 convolution on the
    second-to-last stage (stride 16) also maps where the fracture is: ``forward(x, with_boxes=True)`` returns
    (logits, box logits [B, 1, H/16, W/16]). Trained against the competition's boxes, it tells a from-scratch
    CNN which pixels make a slice positive, which a slice label alone leaves it to guess.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained_file: str = "",
        dropout: float = 0.3,
        box_head: bool = False,
        context: int = 0,
        width: float = 1.0,
        norm: dict | None = None,
    ):
        super().__init__()
        self.context = (
            context  # neighbours each side in the input (`cspine.inputs.slice_stack`); 0 = one slice
        )
        self.width = width  # channel multiplier of a ResNet backbone (`width_args`)
        self.backbone = create_backbone(backbone, pretrained_file, in_channels(context), width)
        # the input normalisation: the pretrained weights' (ImageNet's), or one for a network from scratch;
        # given when a checkpoint rebuilds the network
        norm = norm or (weights_norm(self.backbone) if pretrained_file else UNIFORM_NORM)
        self.norm = InputNorm(in_channels(context), norm)
        # what a checkpoint needs to rebuild this network (`cspine.checkpoints`); the weights are saved apart
        self.arch = {
            "backbone": backbone,
            "dropout": dropout,
            "box_head": box_head,
            "context": context,
            "width": width,
            "norm": {k: list(v) for k, v in norm.items()},
        }
        # what the pooled path gives: MobileNetV3 and LCNet add a head convolution after the last stage,
        # so their pooled vector is head_hidden_size wide, not num_features
        self.num_features = int(
            getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_features, len(SLICE_OUTPUTS))
        self.box_stage = len(self.backbone.feature_info) - 2
        self.box_head = (
            nn.Conv2d(self.backbone.feature_info[self.box_stage]["num_chs"], 1, 1) if box_head else None
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features: float [B, D] for images [B, 3, H, W] in [0, 1]."""
        return self.backbone(self.norm(x))

    def forward(self, x: torch.Tensor, with_boxes: bool = False):
        if not with_boxes:
            return self.head(self.dropout(self.features(x)))
        if self.box_head is None:
            raise ValueError("this SliceNet has no box head (build it with box_head=True)")
        final, (stage,) = self.backbone.forward_intermediates(
            self.norm(x), indices=[self.box_stage], norm=False
        )
        pooled = self.backbone.forward_head(final, pre_logits=True)
        return self.head(self.dropout(pooled)), self.box_head(stage)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both at once (one backbone pass), for feature extraction."""
        f = self.features(x)
        return f, self.head(f)

    def cam_layer(self) -> nn.Module:
        """The backbone's last stage, where Grad-CAM looks (the paper's Fig. 3)."""
        return self.backbone.get_submodule(self.backbone.feature_info[-1]["module"])


class SequenceNet(nn.Module):
    """The study classifier: a bidirectional LSTM over a study's slice features, head to feet.

    Each input feature is standardised with the training set's mean and std (buffers saved with the
    weights; per feature, not per slice, so a slice's absolute fracture probability survives), passed
    through the BLSTM (packed, so padding never reaches it), pooled over the slices (mean and max, both
    masked) and mapped to 8 logits in `TARGETS` order (patient_overall, C1..C7).
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 128,
        layers: int = 1,
        dropout: float = 0.2,
        n_outputs: int = len(TARGETS),
    ):
        super().__init__()
        self.arch = {
            "in_features": in_features,
            "hidden": hidden,
            "layers": layers,
            "dropout": dropout,
            "n_outputs": n_outputs,
        }
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            in_features,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.head = nn.Linear(4 * hidden, n_outputs)

    def fit_standardization(self, slices: torch.Tensor) -> None:
        """Sets the input standardisation from training slices float [N, D]."""
        self.feature_mean.copy_(slices.mean(0))
        self.feature_std.copy_(slices.std(0).clamp(min=1e-3))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits [B, 8] for padded features [B, T, D] and true lengths [B]."""
        x = self.dropout((x - self.feature_mean) / self.feature_std)
        if bool((lengths == x.shape[1]).all()):  # no padding (binned studies, one study): dense, faster
            out, _ = self.lstm(x)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.lstm(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        valid = (
            torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        ).unsqueeze(-1)
        mean = (out * valid).sum(1) / valid.sum(1).clamp(min=1)
        peak = out.masked_fill(~valid, float("-inf")).amax(1)
        return self.head(self.dropout(torch.cat([mean, peak], dim=1)))


class CropNet(nn.Module):
    """One vertebra's fracture logit from its crop slices: a timm CNN per slice, a BiGRU over the slices.

    The shape of the competition's winning models (1st place: a 2D CNN on 15 slices of each vertebra, then
    an LSTM; 2nd: a CNN, then a BiGRU with attention). Each slice's features are pooled by the BiGRU's mean
    and maximum over the slices; a learnt embedding of which vertebra it is (C1's ring looks nothing like
    C5's body) joins them before the classifier, so one model serves the seven vertebrae.

    Input: uint8 [B, slices, channels, size, size] as cut (`cspine.crops`) and long [B] vertebra indices
    (0 = C1). Output: float [B] logits.
    """

    def __init__(
        self,
        backbone: str = "resnet10t",
        in_chans: int = 4,
        hidden: int = 64,
        width: float = 1.0,
        pretrained_file: str = "",
        dropout: float = 0.2,
        norm: dict | None = None,
    ):
        super().__init__()
        self.cnn = create_backbone(backbone, pretrained_file, in_chans=in_chans, width=width)
        norm = norm or (weights_norm(self.cnn) if pretrained_file else UNIFORM_NORM)
        self.norm = InputNorm(in_chans, norm)  # as `SliceNet`: its weights' statistics, or one for all
        self.arch = {
            "backbone": backbone,
            "in_chans": in_chans,
            "hidden": hidden,
            "width": width,
            "dropout": dropout,
            "norm": {k: list(v) for k, v in norm.items()},
        }
        self.rnn = nn.GRU(self.cnn.num_features, hidden, batch_first=True, bidirectional=True)
        self.level = nn.Embedding(len(VERTEBRAE), 16)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * hidden + 16, 1))

    def forward(self, x: torch.Tensor, vertebra: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        b, n = x.shape[:2]
        images = self.norm(x.flatten(0, 1).float() / 255)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        h, _ = self.rnn(self.cnn(images).view(b, n, -1).float())
        pooled = torch.cat([h.mean(1), h.amax(1), self.level(vertebra)], dim=1)
        return self.head(pooled)[:, 0]


@torch.inference_mode()
def crop_probabilities(
    model: CropNet,
    crops: np.ndarray,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    batch_size: int = 28,
) -> np.ndarray:
    """float [S, 7]: C1..C7 probabilities of studies' crops uint8 [S, 7, slices, channels, size, size]."""
    flat = torch.from_numpy(np.ascontiguousarray(crops)).flatten(0, 1)
    which = torch.arange(len(VERTEBRAE)).repeat(len(crops))
    out = []
    for start in range(0, len(flat), batch_size):
        x = flat[start : start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            out.append(
                torch.sigmoid(
                    model(x, which[start : start + batch_size].to(device), channels_last).float()
                ).cpu()
            )
    return torch.cat(out).numpy().reshape(len(crops), len(VERTEBRAE))
