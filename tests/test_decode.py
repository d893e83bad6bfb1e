"""The decode is one linear map, and a radius moved through it is still a guarantee.

Checked against computations that do not use the code under test: PIL's own float resize, the
explicit matrix ``A`` built by decoding unit images (its largest singular value by numpy's SVD),
and the exact smoothed radius of a linear classifier pushed through the decode.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from specformer_deploy.serving.decode import DecodeMap, SentImage, decode_norm, resize_matrix
from specformer_deploy.serving.images import read_image, read_pixels
from specformer_deploy.serving.smoothing import SmoothingParams, in_sent_image, smoothing_answer


def explicit_matrix(sent: tuple[int, int, int], model: tuple[int, int, int]) -> np.ndarray:
    """``A`` column by column: the decode of every unit image of the sent shape."""
    decode = DecodeMap(SentImage(*sent), model)
    size = int(np.prod(sent))
    columns = [decode.apply(np.eye(size, dtype=np.float32)[i].reshape(sent)).reshape(-1) for i in range(size)]
    return np.stack(columns, axis=1).astype(np.float64)


SHAPES = [
    ((1, 8, 8), (1, 4, 4)),      # 2x down
    ((1, 4, 4), (1, 8, 8)),      # 2x up
    ((1, 7, 5), (1, 3, 6)),      # odd sizes, down one way and up the other
    ((1, 5, 5), (3, 5, 5)),      # grey replicated into a 3-channel model
    ((3, 6, 6), (1, 6, 6)),      # colour to a grey model (ITU-R 601)
    ((3, 9, 4), (1, 4, 7)),      # colour to grey, with resizing
    ((1, 6, 9), (3, 4, 4)),      # grey to colour, with resizing
    ((3, 3, 3), (3, 5, 5)),
]


@pytest.mark.parametrize("sent, model", SHAPES)
def test_separable_norm_equals_the_largest_singular_value_of_the_explicit_matrix(sent, model) -> None:
    matrix = explicit_matrix(sent, model)
    assert matrix.shape == (int(np.prod(model)), int(np.prod(sent)))
    exact = np.linalg.svd(matrix, compute_uv=False)[0]
    assert decode_norm(sent, model) == pytest.approx(exact, rel=1e-5)


def test_channel_maps_have_the_norms_the_design_states() -> None:
    assert decode_norm((1, 5, 5), (3, 5, 5)) == pytest.approx(np.sqrt(3))
    assert decode_norm((3, 5, 5), (1, 5, 5)) == pytest.approx(np.linalg.norm([0.299, 0.587, 0.114]))
    assert decode_norm((1, 28, 28), (1, 28, 28)) == 1.0


def test_the_decode_is_linear_and_has_no_rounding() -> None:
    rng = np.random.default_rng(0)
    decode = DecodeMap(SentImage(3, 11, 7), (1, 5, 5))
    a, b = rng.random((3, 11, 7), dtype=np.float32), rng.random((3, 11, 7), dtype=np.float32)
    np.testing.assert_allclose(decode.apply(0.3 * a + 0.7 * b), 0.3 * decode.apply(a) + 0.7 * decode.apply(b),
                               atol=1e-6)
    tiny = np.full((3, 11, 7), 1e-4, dtype=np.float32)  # far below one 8-bit step: survives the decode
    assert decode.apply(tiny).max() == pytest.approx(1e-4, rel=1e-4)


@pytest.mark.parametrize("source, target", [(8, 16), (28, 16), (56, 28), (7, 3), (5, 13), (280, 28), (33, 32)])
def test_resize_is_pils_float_bilinear(source: int, target: int) -> None:
    """The same filter as PIL's BILINEAR on float images (antialiased when shrinking)."""
    x = np.random.default_rng(source).random((source, source)).astype(np.float32)
    pil = np.asarray(Image.fromarray(x, mode="F").resize((target, target), Image.Resampling.BILINEAR))
    ours = resize_matrix(source, target) @ x @ resize_matrix(source, target).T
    np.testing.assert_allclose(ours, pil, atol=1e-6)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_read_image_keeps_grey_grey_and_names_what_was_sent() -> None:
    grey = (np.arange(56 * 40) % 251).astype(np.uint8).reshape(40, 56)
    decoded = read_image(_png(grey), 28, channels=1)
    assert decoded.pixels.shape == (1, 28, 28)
    assert decoded.sent == SentImage(1, 40, 56) and decoded.sent.description == "grey 56x40"
    expected = resize_matrix(40, 28) @ (grey / 255.0) @ resize_matrix(56, 28).T
    np.testing.assert_allclose(decoded.pixels[0], expected, atol=1e-6)
    colour = read_image(_png(np.stack([grey, grey // 2, grey // 3], axis=-1)), 28, channels=3)
    assert colour.sent.description == "colour 56x40" and colour.pixels.shape == (3, 28, 28)
    assert read_image(_png(grey), 28, channels=3).decode.norm == pytest.approx(np.sqrt(3) * decode_norm(
        (1, 40, 56), (1, 28, 28)))


def test_pixels_sent_in_the_model_grid_have_the_identity_or_the_channel_map() -> None:
    grey = np.full((16, 16), 0.25)
    assert read_pixels(grey, 16, channels=1).decode.norm == 1.0
    assert read_pixels(grey, 16, channels=3).decode.norm == pytest.approx(np.sqrt(3))
    assert read_pixels(np.full((3, 16, 16), 0.5), 16, channels=3).decode.norm == 1.0


# -- a linear classifier through the decode: the exact radius is known ---------------------------

def _linear_case(draw_sizes, seed: int):
    (c_sent, h, w), (c_model, s_rows, s_cols) = draw_sizes
    rng = np.random.default_rng(seed)
    sent = rng.random((c_sent, h, w)).astype(np.float32)
    weights = rng.standard_normal(c_model * s_rows * s_cols)
    return sent, weights


shapes = st.tuples(st.tuples(st.sampled_from([1, 3]), st.integers(2, 7), st.integers(2, 7)),
                   st.tuples(st.sampled_from([1, 3]), st.integers(2, 6), st.integers(2, 6)))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(shapes, st.integers(0, 10_000), st.sampled_from([0.25, 0.5, 1.0]))
def test_served_radius_in_the_sent_image_never_exceeds_a_linear_classifiers_exact_radius(sizes, seed, sigma) -> None:
    """``f(x) = [w . x > b]`` on the model grid; through the decode it is ``[w . A s > b]`` on the
    sent image, whose smoothed classifier keeps its label exactly on the ball of radius
    ``|w . A s - b| / ||A^T w||`` around ``s``. The served radius must stay inside it."""
    sent, weights = _linear_case(sizes, seed)
    decode = DecodeMap(SentImage(*sent.shape), sizes[1])
    x = decode.apply(sent)
    bias = float(weights @ x.reshape(-1).astype(np.float64)) - 0.3 * sigma * np.linalg.norm(weights)

    def classify(batch: np.ndarray) -> np.ndarray:
        return (batch.reshape(len(batch), -1).astype(np.float64) @ weights > bias).astype(np.int64)

    params = SmoothingParams(sigma=sigma, n0=50, n=2000, alpha=1e-6, batch_size=2000, seed=seed)
    block = in_sent_image(smoothing_answer(classify, x, 2, params), decode)
    matrix = explicit_matrix(sent.shape, sizes[1])
    exact_sent = abs(weights @ matrix @ sent.reshape(-1) - bias) / np.linalg.norm(matrix.T @ weights)
    exact_model = abs(weights @ x.reshape(-1) - bias) / np.linalg.norm(weights)
    if block["abstain"]:
        return
    assert block["label"] == 1
    assert block["radius"] <= exact_model * (1 + 1e-6)
    assert block["radius_in_sent_image"] <= exact_sent * (1 + 1e-6)
    assert block["radius_in_sent_image"] == pytest.approx(block["radius"] / decode.norm)


def test_the_bound_is_tight_for_a_classifier_that_weighs_replicated_channels_equally() -> None:
    """Grey sent to a 3-channel model, ``w`` equal across the channels: ``||A^T w|| = ||A|| ||w||``,
    so the served radius in the grey image is the exact one up to the sampling's slack."""
    rng = np.random.default_rng(3)
    sent = rng.random((1, 6, 6)).astype(np.float32)
    grey_weights = rng.standard_normal(36)
    weights = np.tile(grey_weights, 3)
    decode = DecodeMap(SentImage(1, 6, 6), (3, 6, 6))
    x = decode.apply(sent)
    sigma = 0.5
    bias = float(weights @ x.reshape(-1)) - 1.0 * sigma * np.linalg.norm(weights)

    def classify(batch: np.ndarray) -> np.ndarray:
        return (batch.reshape(len(batch), -1).astype(np.float64) @ weights > bias).astype(np.int64)

    block = in_sent_image(smoothing_answer(classify, x, 2, SmoothingParams(sigma=sigma, n=200_000, alpha=0.001,
                                                                            batch_size=50_000)), decode)
    exact = abs(3 * grey_weights @ sent.reshape(-1) - bias) / np.linalg.norm(3 * grey_weights)
    assert block["radius_in_sent_image"] <= exact
    assert block["radius_in_sent_image"] >= 0.95 * exact
    # Stating the model grid's radius as the grey image's would promise sqrt(3) times too much.
    assert block["radius"] > 1.6 * exact


def test_the_plain_sentence_names_the_sent_image_its_radius_and_the_confidence() -> None:
    from specformer_deploy.serving.smoothing import statement

    x = np.zeros((1, 4, 4), dtype=np.float32)
    decode = DecodeMap(SentImage(1, 8, 8), (1, 4, 4))
    always_three = lambda batch: np.full(len(batch), 3)  # noqa: E731
    block = in_sent_image(smoothing_answer(always_three, x, 10, SmoothingParams(sigma=0.5, n=1000)), decode)
    assert statement(block, "d.png") == (f"certified: label 3 for every image within L2 "
                                         f"{block['radius'] / decode.norm:.3g} of d.png (in its own grey pixels, "
                                         "as sent), with probability 0.999")
    coin = lambda batch: np.arange(len(batch)) % 2  # noqa: E731
    abstained = in_sent_image(smoothing_answer(coin, x, 2, SmoothingParams(sigma=0.5, n=1000)), decode)
    assert abstained["abstain"] and statement(abstained, "d.png").startswith("not certified: the smoothed classifier "
                                                                              "abstains on d.png")
    asked = in_sent_image(smoothing_answer(always_three, x, 10, SmoothingParams(sigma=0.5, n=1000, radius=0.2)),
                          decode)
    assert asked["radius_asked_in_sent_image"] == pytest.approx(0.2 / decode.norm)
    assert statement(asked, "d.png").startswith(f"robust at L2 {0.2 / decode.norm:.3g} of d.png")
