"""The head's attention in training: the true lesion, or (``--imperfect-attention P``) a lesion drawn as badly as
the decoder draws one on data it was not trained on.

At prediction the head attends to the decoder's lesion probability; in training it attends to the true mask, so it
learns the subtype from the first iteration. On phantom site B that costs the head most of its cross-site loss: shown
site B's *true* lesions, a head trained at site A names their subtypes as well as site A's (macro-F1 0.850 against
0.852); shown the decoder's lesion centred on the true one, 0.728 (bench/head_on_true_masks.py --decompose,
docs/measurements-classification.md). The decoder draws part of a faint lesion, softly; the head never saw such
an attention map in training.

:func:`imperfect_attention` shows it one in a fraction of the training patches: the true lesion cut by a random plane
(the part kept: ``KEPT_FRACTION``, a drawn part as the decoder draws one side of a faint lesion), then blended with
the decoder's own detached lesion probability of that patch by a random weight (its real errors: soft edges, spill
into the gland, false fragments). Training cases' predictions are near-perfect late in training, which is why
attending to the decoder's lesion alone (``--attend-true-lesion no``) cannot show the head a shifted site's errors.
"""

from __future__ import annotations

import torch

KEPT_FRACTION = (0.3, 1.0)  # share of the lesion's voxels the cut keeps, drawn uniformly
TRUE_WEIGHT = (0.0, 1.0)  # weight of the (cut) true mask against the decoder's probability, drawn uniformly


def cut_by_plane(lesion: torch.Tensor, kept_fraction: float, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """The voxels of a binary ``lesion`` map (spatial dims only) on one side of a plane of random direction, placed
    so that about ``kept_fraction`` of them stay (at least one); an empty map comes back as it is."""
    coordinates = torch.nonzero(lesion > 0.5)
    if len(coordinates) == 0:
        return lesion.clone()
    direction = torch.randn(coordinates.shape[1], generator=generator)
    position = coordinates.float() @ (direction / direction.norm().clamp_min(1e-6))
    kept = max(1, round(kept_fraction * len(coordinates)))
    threshold = torch.kthvalue(position, kept).values
    out = torch.zeros_like(lesion)
    inside = coordinates[position <= threshold]
    out[tuple(inside.T)] = 1
    return out


def imperfect_attention(true_attention: torch.Tensor, predicted_attention: torch.Tensor, share: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The head's attention for a training batch: ``true_attention`` (B, C, *spatial; the last channel the lesion),
    except in about ``share`` of the patches, whose lesion channel is cut by a plane and then every channel blended
    with ``predicted_attention`` (the decoder's detached probabilities, same shape) by a weight drawn from
    ``TRUE_WEIGHT``."""
    if share <= 0:
        return true_attention
    out = true_attention.clone()
    chosen = torch.rand(len(out), generator=generator) < share
    for b in torch.nonzero(chosen).flatten().tolist():
        kept = float(torch.empty(1).uniform_(*KEPT_FRACTION, generator=generator))
        out[b, -1] = cut_by_plane(out[b, -1].cpu(), kept, generator).to(out.device)
        weight = float(torch.empty(1).uniform_(*TRUE_WEIGHT, generator=generator))
        out[b] = weight * out[b] + (1 - weight) * predicted_attention[b].to(out.dtype)
    return out
