"""The comparison-based label map equals torch.argmax, ties included (lowest index wins)."""

import pytest
import torch

from nnunet_mtl.inference.labels import labels_from_scores


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_equals_torch_argmax(dim: int, classes: int) -> None:
    generator = torch.Generator().manual_seed(classes)
    shape = [4, 6, 7, 5]
    shape.insert(dim, classes)
    # coarse values make ties frequent: argmax returns the first maximal index, and so must this
    scores = torch.randint(0, 3, shape, generator=generator).float()
    expected = scores.argmax(dim)
    got = labels_from_scores(scores, dim=dim)
    assert got.dtype == torch.uint8
    assert torch.equal(got.long(), expected)
    assert (scores == scores.amax(dim, keepdim=True)).sum(dim).gt(1).any()  # the fixture does hold ties


def test_too_many_classes_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        labels_from_scores(torch.zeros(256, 2))


def test_the_predictor_labels_each_logits_tensor_once_and_never_a_changed_one() -> None:
    from nnunet_mtl.inference.predictor import MultiTaskPredictor

    predictor = MultiTaskPredictor(device=torch.device("cpu"))
    logits = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    first = predictor.crop_labels(logits)
    assert torch.equal(torch.from_numpy(first).long(), logits.argmax(0))
    assert predictor.crop_labels(logits) is first  # the same tensor: no second computation
    other = logits.flip(0)
    assert torch.equal(torch.from_numpy(predictor.crop_labels(other)).long(), other.argmax(0))
