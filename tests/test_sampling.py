"""Sampling transforms (glm3.runtime.sampling.process_logits) against their definitions, on logits built by hand:
repetition penalty (CTRL: a seen token's positive logit divided by the penalty, a negative one multiplied),
temperature, top-k and top-p (nucleus: the smallest set of the most likely tokens whose mass reaches p)."""

import numpy as np
import pytest

from glm3.runtime.sampling import SamplingParams, process_logits

NONE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
HISTORY = np.array([[0, 1, 1, 2]]), np.array([[1, 1, 1, 0]])  # tokens 0 and 1 seen (1 twice); 2 is padding


def transform(logits, **settings):
    return process_logits(np.array([logits], np.float32), *HISTORY, **{**NONE, **settings})[0]


def test_no_transform_is_the_identity_and_a_copy():
    logits = np.array([[2.0, -1.0, 0.5, 3.0]], np.float32)
    out = process_logits(logits, *HISTORY, **NONE)
    np.testing.assert_array_equal(out, logits)
    assert out is not logits


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits_once():
    out = transform([2.0, -1.0, 0.5, 3.0], repetition_penalty=2.0)
    # token 0 (seen, positive) halved; token 1 (seen twice, negative) doubled once; token 2 is only padding in
    # the history; token 3 was never seen.
    np.testing.assert_array_equal(out, [1.0, -2.0, 0.5, 3.0])


def test_temperature_divides_every_logit():
    np.testing.assert_allclose(transform([2.0, -1.0, 0.5, 3.0], temperature=0.5), [4.0, -2.0, 1.0, 6.0])


def test_top_k_keeps_the_k_largest():
    out = transform([2.0, -1.0, 0.5, 3.0, 1.0], top_k=2)
    assert np.isneginf(out).tolist() == [False, True, True, False, True]
    np.testing.assert_array_equal(out[[0, 3]], [2.0, 3.0])
    np.testing.assert_array_equal(transform([2.0, -1.0], top_k=5), [2.0, -1.0])  # k beyond the vocabulary


@pytest.mark.parametrize("top_p, kept", [(0.3, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_of_likely_tokens_holding_p(top_p, kept):
    probs = np.array([0.15, 0.05, 0.5, 0.3])  # by likelihood: tokens 2 (0.5), 3 (0.3), 0 (0.15), 1 (0.05)
    order = [2, 3, 0, 1]
    out = transform(np.log(probs), top_p=top_p)
    expected = sorted(order[i] for i in kept)
    assert sorted(np.flatnonzero(np.isfinite(out)).tolist()) == expected
    np.testing.assert_allclose(out[expected], np.log(probs)[expected], rtol=1e-6)


def test_transforms_apply_in_order_penalty_temperature_top_k_top_p():
    logits = [4.0, 3.0, 2.0, 1.0]
    out = transform(logits, repetition_penalty=4.0, temperature=0.5, top_k=3, top_p=0.9)
    # penalty: [1, 0.75, 2, 1]; temperature: [2, 1.5, 4, 2]; top_k 3 drops token 1 (1.5), the smallest.
    after_k = np.array([2.0, -np.inf, 4.0, 2.0])
    probs = np.exp(after_k - after_k.max()) / np.exp(after_k - after_k.max()).sum()  # [0.106, 0, 0.787, 0.106]
    assert probs[2] < 0.9 < probs[2] + probs[0] + probs[3]  # so top_p 0.9 keeps all three
    np.testing.assert_allclose(out, after_k, rtol=1e-6)


def _frequencies(logits, draws: int = 3000, **settings) -> np.ndarray:
    """How often each token is drawn from fixed logits, one seed a draw (each seed: its own generator)."""
    logits = np.array([logits], np.float32)
    history, mask = np.zeros((1, 0), np.int64), np.zeros((1, 0), np.int32)
    picks = [
        int(
            SamplingParams(do_sample=True, seed=seed, **settings).choose(
                logits, history, mask, [np.random.default_rng([seed, 0])]
            )[0]
        )
        for seed in range(draws)
    ]
    return np.bincount(picks, minlength=logits.shape[1]) / draws


def test_sampling_draws_tokens_with_the_transformed_probabilities():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    # top_p 0.75 keeps tokens 0 and 1, renormalised to 0.625 and 0.375.
    np.testing.assert_allclose(_frequencies(logits, top_p=0.75), [0.625, 0.375, 0.0, 0.0], atol=0.03)
    # top_k 3 keeps 0, 1, 2: 0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95.
    np.testing.assert_allclose(_frequencies(logits, top_k=3), [0.526, 0.316, 0.158, 0.0], atol=0.03)
    # temperature 2: probabilities proportional to p ** (1 / 2).
    flat = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(_frequencies(logits, temperature=2.0), flat / flat.sum(), atol=0.03)
    # temperature 0.5: proportional to p ** 2 (sharper).
    sharp = np.square([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(_frequencies(logits, temperature=0.5), sharp / sharp.sum(), atol=0.03)


def test_top_k_keeps_every_token_tied_with_the_kth():
    """Ties at the k-th score are all kept, as HuggingFace's TopKLogitsWarper does (scores below the k-th
    largest are removed), so the draw does not depend on the order of tied tokens."""
    logits = np.array([[3.0, 1.0, 1.0, 1.0, 0.5]], np.float32)
    kept = process_logits(
        logits, np.zeros((1, 0)), np.zeros((1, 0)), temperature=1.0, top_k=2, top_p=1.0, repetition_penalty=1.0
    )
    assert np.isfinite(kept[0]).tolist() == [True, True, True, True, False]
    frequency = _frequencies(logits[0], top_k=2)
    p = np.exp([3.0, 1.0, 1.0, 1.0]) / np.exp([3.0, 1.0, 1.0, 1.0]).sum()
    np.testing.assert_allclose(frequency, [*p, 0.0], atol=0.03)
    assert frequency[1:4].min() > 0.05  # each tied token is drawn


def test_settings_no_sampler_can_use_are_refused():
    for bad in (
        {"do_sample": True, "temperature": 0.0},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"repetition_penalty": 0.0},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    SamplingParams(temperature=0.0)  # greedy ignores the temperature


def test_a_rows_choice_does_not_depend_on_the_rows_beside_it():
    """The engine chooses per sequence, the generation loop per batch: both give the same tokens."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 50)).astype(np.float32)
    history = rng.integers(0, 50, (5, 7))
    mask = np.ones_like(history)
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=11)
    batch = params.choose(logits, history, mask, [params.generator(row) for row in range(5)])
    alone = [
        params.choose(logits[r : r + 1], history[r : r + 1], mask[r : r + 1], [params.generator(r)])[0]
        for r in range(5)
    ]
    assert batch.tolist() == alone and len(set(alone)) > 1
