"""TTA views: each is undone by its inverse, all 8 differ, and combining views matches hand sums."""

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.cli import UserError
from pipeline.tta import VIEWS, combine_views, get_views, predict_views

SQUARE = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
WIDE = torch.arange(2 * 3 * 4 * 6).reshape(2, 3, 4, 6)


def test_there_are_eight_named_views():
    assert list(VIEWS) == [
        "identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose"
    ]  # fmt: skip
    assert all(v.name == k for k, v in VIEWS.items())


@pytest.mark.parametrize("name", list(VIEWS))
@pytest.mark.parametrize("x", [SQUARE, WIDE], ids=["square", "non_square"])
def test_inverse_undoes_view(name, x):
    view = VIEWS[name]
    out = view.forward(x)
    assert out.shape[:2] == x.shape[:2]
    assert torch.equal(view.inverse(out), x)


@pytest.mark.parametrize("name", ["rot90", "rot270", "transpose", "antitranspose"])
def test_quarter_turns_and_transposes_swap_height_and_width(name):
    assert VIEWS[name].forward(WIDE).shape == (2, 3, 6, 4)


@pytest.mark.parametrize("name", ["identity", "hflip", "vflip", "rot180"])
def test_flips_keep_shape(name):
    assert VIEWS[name].forward(WIDE).shape == WIDE.shape


def test_views_are_pairwise_distinct():
    outs = {name: v.forward(SQUARE) for name, v in VIEWS.items()}
    for a, b in itertools.combinations(outs, 2):
        assert not torch.equal(outs[a], outs[b]), (a, b)


def test_views_match_their_definitions():
    x = SQUARE[0, 0]  # (H, W) = (4, 4)
    h, w = x.shape
    anti = VIEWS["antitranspose"].forward(SQUARE)[0, 0]
    for i, j in itertools.product(range(h), range(w)):
        assert anti[i, j] == x[w - 1 - j, h - 1 - i]
    assert torch.equal(VIEWS["hflip"].forward(SQUARE)[0, 0, :, 0], x[:, -1])
    assert torch.equal(VIEWS["vflip"].forward(SQUARE)[0, 0, 0], x[-1])
    assert torch.equal(VIEWS["transpose"].forward(SQUARE)[0, 0], x.T)


def test_views_are_pure():
    x = SQUARE.clone()
    for view in VIEWS.values():
        view.inverse(view.forward(x))
    assert torch.equal(x, SQUARE)


def test_get_views_keeps_order_and_names_unknown_view():
    assert [v.name for v in get_views(["rot90", "identity"])] == ["rot90", "identity"]
    with pytest.raises(UserError, match=r"'rot45'.*valid views.*antitranspose"):
        get_views(["identity", "rot45"])


def _invariant_model():
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 1)

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        return linear(x.float().mean(dim=(2, 3)))  # (B, 1)

    return model_fn


def test_tta_on_view_invariant_model_equals_one_pass():
    model_fn = _invariant_model()
    images = torch.randint(0, 256, (5, 3, 8, 6), dtype=torch.uint8)
    logits = predict_views(model_fn, images, list(VIEWS))
    with torch.no_grad():
        one = model_fn(images)[:, 0]
    assert logits.shape == (8, 5)
    for row in logits:
        torch.testing.assert_close(row, one)
    probs = combine_views(logits, "mean")
    np.testing.assert_allclose(probs, torch.sigmoid(one).numpy(), rtol=1e-6)


def test_predict_views_accepts_names_and_flat_logits():
    def model_fn(x):
        return x.float()[:, 0, 0, 0]  # top-left pixel: differs between views

    x = SQUARE.float()
    logits = predict_views(model_fn, x, ["identity", "hflip", "rot180"])
    expected = torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, -1]])
    assert torch.equal(logits, expected)


def test_predict_views_rejects_bad_model_output():
    with pytest.raises(ValueError, match="shape"):
        predict_views(lambda x: x.float().mean(dim=(2, 3)), SQUARE, ["identity"])


LN3 = math.log(3.0)
KNOWN = np.array([[0.0, LN3], [LN3, LN3]])  # sigmoid: [[0.5, 0.75], [0.75, 0.75]]


def test_combine_views_mean_of_probabilities():
    np.testing.assert_allclose(combine_views(KNOWN, "mean"), [0.625, 0.75])


def test_combine_views_sigmoid_of_mean_logit():
    mid = 1.0 / (1.0 + 3.0**-0.5)  # sigmoid(ln(3) / 2)
    np.testing.assert_allclose(combine_views(torch.tensor(KNOWN), "logit"), [mid, 0.75])


def test_combine_views_mean_of_ranks():
    # view 0 ranks [1, 2] / 2; view 1 is tied: [1.5, 1.5] / 2
    np.testing.assert_allclose(combine_views(KNOWN, "rank"), [0.625, 0.875])


def test_combine_views_default_is_mean_and_unknown_is_refused():
    np.testing.assert_allclose(combine_views(KNOWN), combine_views(KNOWN, "mean"))
    with pytest.raises(UserError, match="median"):
        combine_views(KNOWN, "median")
