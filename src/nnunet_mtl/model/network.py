"""The one network class used for training and prediction: nnU-Net's planned U-Net plus a subtype head.

nnU-Net builds networks from the plans by dotted class name (``get_network_from_plans``), passing the planned
architecture kwargs. Our derived plans name :class:`MultiTaskUNet` and add ``backbone`` (the class nnU-Net planned,
PlainConvUNet or ResidualEncoderUNet) and the head settings, so nnU-Net's own builder makes our network, in the
trainer and in the predictor alike.

The backbone's ``encoder`` and ``decoder`` become our own attributes, so the state-dict keys of the U-Net part are
exactly those of a plain nnU-Net model (``encoder.*``, ``decoder.*``) and nnU-Net checkpoints load into it, with
only ``classifier.*`` left fresh. One encoder pass per forward feeds both heads.
"""

from __future__ import annotations

import pydoc
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("bottleneck", "multiscale", "lesion_attention", "lesion_context")
# heads that pool where the lesion is, and so need its probability (or, in training, its true mask)
ATTENTION_HEADS = ("lesion_attention", "lesion_context")


def _mlp(in_features: int, hidden: int, dropout: float, num_subtypes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(in_features),  # pooled features of different stages come at different scales
        nn.Linear(in_features, hidden),
        nn.LeakyReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_subtypes),
    )


class BottleneckHead(nn.Module):
    """The report's head: global average pool of the deepest encoder stage, one linear layer."""

    def __init__(self, channels: list[int], num_subtypes: int):
        super().__init__()
        self.linear = nn.Linear(channels[-1], num_subtypes)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        deepest = skips[-1]
        return self.linear(deepest.mean(dim=tuple(range(2, deepest.ndim))))


class _StagesHead(nn.Module):
    """Pooled vectors (``vectors_per_stage`` per stage) of the last ``n_stages`` encoder stages into an MLP."""

    vectors_per_stage = 2

    def __init__(self, channels: list[int], num_subtypes: int, n_stages: int = 3, hidden: int = 128,
                 dropout: float = 0.3, extra_features: int = 0):
        super().__init__()
        self.n_stages = min(n_stages, len(channels))
        in_features = self.vectors_per_stage * sum(channels[-self.n_stages:]) + extra_features
        self.mlp = _mlp(in_features, hidden, dropout, num_subtypes)


class MultiScaleHead(_StagesHead):
    """Pooled features of the last ``n_stages`` encoder stages, concatenated, then a small MLP with dropout.

    Public attempts found shallower stages carry more of the texture that tells subtypes apart than the bottleneck
    alone; average and max pooling together keep both the overall and the most lesion-like response.
    """

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for feature in skips[-self.n_stages:]:
            flat = feature.flatten(2)
            pooled += [flat.mean(dim=2), flat.amax(dim=2)]
        return self.mlp(torch.cat(pooled, dim=1))


def _pool_to(weights: torch.Tensor, size: torch.Size, factor: tuple[int, ...] | None = None) -> torch.Tensor:
    """Average ``weights`` down to ``size``; by a fixed ``factor`` (the stage's stride) when the sizes divide.

    An average pool with a constant kernel gives the same bins as adaptive pooling on divisible sizes (patches and
    stride-padded crops always are), and it exports to ONNX with free spatial sizes, which adaptive pooling to a
    size read from another tensor does not.
    """
    if factor is not None and all(w == s * f for w, s, f in zip(weights.shape[2:], size, factor)):
        if all(f == 1 for f in factor):
            return weights
        pool = F.avg_pool3d if weights.ndim == 5 else F.avg_pool2d
        return pool(weights, kernel_size=factor, stride=factor)
    pool = F.adaptive_avg_pool3d if weights.ndim == 5 else F.adaptive_avg_pool2d
    return pool(weights, size)


class LesionAttentionHead(_StagesHead):
    """Encoder features pooled where the decoder sees the lesion, then an MLP.

    The subtype is a property of the lesion, which may fill a few hundred of a patch's hundred thousand voxels;
    global pooling drowns it. The decoder's lesion probability (detached: classification must not bend the
    segmentation) weights each of the last ``n_stages`` encoder stages, by default all of them: a small lesion is
    a voxel or two at the deep stages, whose features mostly describe its surroundings, while the full-resolution
    stage still sees its own attenuation, which is what tells the subtypes apart. Where no lesion is predicted the
    weights are uniform and the head falls back to global pooling. Still one encoder pass.

    No global average beside it: it describes the field of view, a lesion-centred patch in training but a whole
    crop in fast prediction, and a head that leaned on it called most cysts hyper-enhancing on the demo's test set
    (macro-F1 0.35 in one run, where tiled prediction of the same model gave 0.44).

    Beside the features, the mean and standard deviation of the (normalised) input image under the same weights:
    the lesion's attenuation is what separates the subtypes (a logistic regression on it alone: 0.94 accuracy on
    phantom lesions), and handing it to the MLP directly spares a short run from having to learn it.
    """

    vectors_per_stage = 1
    image_moments = 2  # mean and standard deviation per input channel

    def __init__(self, channels: list[int], num_subtypes: int, n_stages: int = 3, hidden: int = 128,
                 dropout: float = 0.3, input_channels: int = 1, stage_strides: list[tuple[int, ...]] | None = None):
        super().__init__(channels, num_subtypes, n_stages, hidden, dropout, self.image_moments * input_channels)
        # each stage's total stride relative to the input (None: pool adaptively), see _pool_to
        self.stage_strides = stage_strides

    def forward(self, skips: list[torch.Tensor], lesion_probability: torch.Tensor,
                image: torch.Tensor) -> torch.Tensor:
        pooled = self._pooled_stages(skips, lesion_probability)
        weights = _pool_to(lesion_probability, image.shape[2:], (1,) * (image.ndim - 2))
        pooled += list(_weighted_moments(image, weights))
        return self.mlp(torch.cat(pooled, dim=1))

    def _pooled_stages(self, skips: list[torch.Tensor], lesion_probability: torch.Tensor) -> list[torch.Tensor]:
        """Each of the last ``n_stages`` encoder stages averaged under the lesion probability pooled to its grid."""
        pooled = []
        strides = self.stage_strides or [None] * len(skips)
        for feature, stride in zip(skips[-self.n_stages:], strides[-self.n_stages:]):
            weights = _pool_to(lesion_probability, feature.shape[2:], stride).flatten(2) + 1e-6
            pooled.append((feature.flatten(2) * weights).sum(dim=2) / weights.sum(dim=2))
        return pooled


def _weighted_moments(image: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per channel of ``image`` (B, C, *spatial) under ``weights`` (B, 1, *spatial)."""
    weights = weights.flatten(2) + 1e-6
    flat = image.flatten(2)
    mean = (flat * weights).sum(dim=2) / weights.sum(dim=2)
    variance = ((flat - mean[..., None]) ** 2 * weights).sum(dim=2) / weights.sum(dim=2)
    return mean, torch.sqrt(variance + 1e-6)


class LesionContextHead(LesionAttentionHead):
    """The lesion-attention head, told also what the gland around the lesion looks like.

    A lesion's subtype is read against its parenchyma: hypo- or hyper-enhancing *relative to the gland*, fluid
    against enhancing tissue. The lesion's own intensity moments are absolute (nnU-Net's CT normalisation is one
    global z-score), so a scanner or contrast phase that scales enhancement moves them, and the head learned at one
    site misreads another (a feature model on true masks: 0.78 across sites on absolute intensities, 0.87 on ratios
    to the shell; docs/measurements-classification.md). Beside the lesion's moments this head gets the mean and SD
    of the image in a shell of gland around it (the lesion weights dilated by ``SHELL_VOXELS``, minus the lesion,
    times the gland probability) and the lesion-minus-shell difference of the means.

    Its attention has one channel per foreground class (class 1 .. K-1, the last the lesion), so the gland comes
    from the same decoder pass as the lesion (in training: the true masks of both).
    """

    SHELL_VOXELS = 3  # dilation radius in voxels, every axis (3 mm in-plane, 6 mm across slices at the demo spacing)
    image_moments = 5  # lesion mean, SD; shell mean, SD; lesion minus shell mean (per input channel)

    def forward(self, skips: list[torch.Tensor], attention: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        lesion = attention[:, -1:]
        gland = attention[:, :-1].sum(dim=1, keepdim=True).clamp(0, 1) if attention.shape[1] > 1 \
            else torch.ones_like(lesion)
        pooled = self._pooled_stages(skips, lesion)
        weights = _pool_to(lesion, image.shape[2:], (1,) * (image.ndim - 2))
        k = 2 * self.SHELL_VOXELS + 1
        pool = F.max_pool3d if image.ndim == 5 else F.max_pool2d
        dilated = pool(weights, kernel_size=k, stride=1, padding=self.SHELL_VOXELS)
        shell = (dilated - weights).clamp(min=0) * gland
        lesion_mean, lesion_sd = _weighted_moments(image, weights)
        shell_mean, shell_sd = _weighted_moments(image, shell)
        pooled += [lesion_mean, lesion_sd, shell_mean, shell_sd, lesion_mean - shell_mean]
        return self.mlp(torch.cat(pooled, dim=1))


def _stage_strides(encoder: nn.Module) -> list[tuple[int, ...]] | None:
    """Each encoder stage's stride relative to the input: the product of the per-stage strides up to it."""
    strides = getattr(encoder, "strides", None)  # per stage, one entry per axis (PlainConv and ResEnc encoders)
    if strides is None:
        return None
    return [tuple(int(v) for v in row) for row in np.cumprod(np.array(strides, dtype=int), axis=0)]


class MultiTaskUNet(nn.Module):
    """Shared encoder, nnU-Net segmentation decoder, subtype classification head.

    ``forward`` returns ``(segmentation, subtype_logits)``; segmentation is a list (deep supervision) in training,
    one tensor otherwise. With ``return_classification = False`` it returns segmentation alone, which is what
    nnU-Net's stock predictor and validation expect.
    """

    def __init__(self, input_channels: int, num_classes: int, backbone: str, num_subtypes: int,
                 head: str = "bottleneck", head_stages: int | None = None, head_hidden: int = 128,
                 head_dropout: float = 0.3,
                 deep_supervision: bool = False, return_classification: bool = True, **backbone_kwargs: Any):
        super().__init__()
        backbone_class = pydoc.locate(backbone)
        if backbone_class is None:
            raise ImportError(f"backbone class {backbone!r} named in the plans cannot be imported")
        if head not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {head!r}; choose one of {HEAD_KINDS}")
        unet = backbone_class(input_channels=input_channels, num_classes=num_classes,
                              deep_supervision=deep_supervision, **backbone_kwargs)
        self._backbone_class = backbone_class
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        channels = list(self.encoder.output_channels)
        if head_stages is None:  # the attention heads read every stage; the multi-scale head the deepest three
            head_stages = len(channels) if head in ATTENTION_HEADS else 3
        if head == "bottleneck":
            self.classifier: nn.Module = BottleneckHead(channels, num_subtypes)
        elif head == "multiscale":
            self.classifier = MultiScaleHead(channels, num_subtypes, head_stages, head_hidden, head_dropout)
        else:
            head_class = LesionContextHead if head == "lesion_context" else LesionAttentionHead
            self.classifier = head_class(channels, num_subtypes, head_stages, head_hidden, head_dropout,
                                         input_channels, _stage_strides(self.encoder))
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.num_subtypes = num_subtypes
        self.head_kind = head
        self.return_classification = return_classification

    @property
    def attends(self) -> bool:
        """Whether the head needs an attention input (the lesion's probability, and for some heads the gland's)."""
        return self.head_kind in ATTENTION_HEADS

    @property
    def attention_channels(self) -> int:
        """Channels of the head's attention input: the lesion alone, or every foreground class (lesion last)."""
        return self.num_classes - 1 if self.head_kind == "lesion_context" else 1

    def attention_from_probabilities(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The head's attention from class probabilities (B, K, *spatial); the last label is the lesion (the class
        whose kind the head names)."""
        return probabilities[:, -self.attention_channels:]

    def attention_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The head's attention from a label map (B, 1, *spatial): the true masks, for training."""
        classes = range(self.num_classes - self.attention_channels, self.num_classes)
        return torch.cat([(labels == c).float() for c in classes], dim=1)

    def forward(self, x: torch.Tensor, lesion_mask: torch.Tensor | None = None,
                attention_from: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``lesion_mask`` (training only, optional): the head's attention from the true masks
        (:meth:`attention_from_labels`), (B, attention_channels, *spatial). ``attention_from`` (training only,
        optional, without ``lesion_mask``): makes the head's attention from the decoder's own (detached), e.g. the
        true lesion blended with it (training/attention.py).

        Attending to the true lesion while training lets the head learn the subtype from the first iteration,
        instead of waiting for the decoder to find lesions; at prediction it attends to the decoder's lesion.
        """
        skips = self.encoder(x)
        segmentation = self.decoder(skips)
        if not self.return_classification:
            return segmentation
        if self.attends and lesion_mask is None:
            full = segmentation[0] if isinstance(segmentation, (list, tuple)) else segmentation
            # detached: classification must not bend the segmentation
            with torch.autocast(x.device.type, enabled=False):
                lesion_mask = self.attention_from_probabilities(torch.softmax(full.detach().float(), dim=1))
                if attention_from is not None:
                    lesion_mask = attention_from(lesion_mask)
        return segmentation, self._head(skips, x, lesion_mask)

    def classify(self, x: torch.Tensor, lesion_probability: torch.Tensor | None = None) -> torch.Tensor:
        """Subtype logits from the encoder and the head alone, for a tile whose lesion probability is known.

        Prediction first segments the crop, then classifies one patch centred on the predicted lesion; the decoder
        pass over that patch would only recompute the lesion probability the crop's pass already gave (about half
        of the patch's network time at full size). ``lesion_probability`` (B, attention_channels, *spatial,
        :meth:`attention_from_probabilities`) is needed by the attention heads only.
        """
        if self.attends and lesion_probability is None:
            raise ValueError(f"the {self.head_kind} head needs the tile's lesion probability")
        return self._head(self.encoder(x), x, lesion_probability)

    def _head(self, skips: list[torch.Tensor], x: torch.Tensor, lesion_probability: torch.Tensor | None
              ) -> torch.Tensor:
        # The head runs in fp32 even under autocast: it sums features over a whole patch or crop (overflow in fp16,
        # 8 bits of mantissa in bfloat16, NaN losses measured on CPU), and costs next to nothing at any precision.
        with torch.autocast(x.device.type, enabled=False):
            skips = [s.float() for s in skips]
            if not self.attends:
                return self.classifier(skips)
            return self.classifier(skips, lesion_probability.float(), x.float())

    def initialize(self, module: nn.Module) -> None:
        """Called by nnU-Net's builder through ``network.apply(network.initialize)``: the backbone's own init."""
        self._backbone_class.initialize(module)


def parameter_counts(model: MultiTaskUNet) -> dict[str, int]:
    """True parameter counts per part, each tensor counted once.

    The decoder holds a reference to the encoder, so ``decoder.parameters()`` (and the state dict) would count the
    encoder twice; we count the decoder as what it has beyond the encoder.
    """
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    encoder = sum(p.numel() for p in model.encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters() if id(p) not in encoder_ids)
    head = sum(p.numel() for p in model.classifier.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"encoder": encoder, "decoder": decoder, "head": head, "total": total}


def load_segmentation_weights(model: MultiTaskUNet, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load U-Net weights (ours or a segmentation-only nnU-Net checkpoint); return the head keys left fresh.

    Anything other than missing head weights is an error: a silent partial load would train from a wrong start.
    """
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"checkpoint does not fit this network: shapes differ for {mismatched[:5]}")
    result = model.load_state_dict(state_dict, strict=False)
    not_head = [k for k in result.missing_keys if not k.startswith("classifier.")]
    if not_head or result.unexpected_keys:
        raise ValueError(f"checkpoint does not fit this network: missing {not_head[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")
    return list(result.missing_keys)
