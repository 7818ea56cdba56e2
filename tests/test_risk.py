"""Risk measures of lt_theory.measures.risk against exact references.

References: label-noise statistics worked out by hand and the labels injected by the data module; thresholds
and effective model complexity on explicit tables; peak prominences against hand values and
``scipy.signal.peak_prominences``, and peak positions against the noise-free curve; the bias-variance
decompositions against a hand-computed example, the algebraic identities they must satisfy (float64), an
independent implementation from probabilities, and the closed-form variance of least squares with Gaussian
noise (unbiasedness of the variance estimator).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.measures.risk import (
    BiasVariance,
    cross_entropy_bias_variance,
    disjoint_splits,
    effective_model_complexity,
    evaluate_classifier,
    find_peaks,
    interpolation_threshold,
    mse_bias_variance,
    noisy_label_errors,
)

EXACT = 1e-12  # float64 tolerance for identities that hold exactly in exact arithmetic (observed ~1e-16)



@pytest.fixture(scope="module")
def noisy_data() -> SyntheticCIFARDataModule:
    dm = SyntheticCIFARDataModule(num_train=200, num_test=20, num_classes=10, label_noise=0.2, seed=3)
    dm.setup()
    return dm


# ------------------------------------------------------------------------------------------------------------
# Label noise and memorisation.


def test_noisy_label_errors_hand_made_case():
    clean = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    labels = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0])  # examples 4..7 are noisy
    noisy = torch.tensor([4, 5, 6, 7])
    # clean part: 3 of 4 right; noisy part: 4 -> noisy label (memorised), 5 -> noisy label (memorised),
    # 6 -> clean label (corrected), 7 -> neither.
    predictions = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2])
    errors = noisy_label_errors(predictions, labels, clean, noisy)
    assert errors.train_error == 3 / 8
    assert errors.train_error_clean == 1 / 4
    assert errors.train_error_noisy == 2 / 4
    assert errors.memorized_fraction == 2 / 4
    assert errors.corrected_fraction == 1 / 4
    assert (errors.num_clean, errors.num_noisy) == (4, 4)

    # Logits whose argmax is the prediction, a boolean mask, and no indices at all give the same numbers.
    logits = F.one_hot(predictions, 4).double() * 3.0 - 1.0
    assert noisy_label_errors(logits, labels, clean, noisy) == errors
    mask = torch.zeros(8, dtype=torch.bool)
    mask[noisy] = True
    assert noisy_label_errors(predictions, labels, clean, mask) == errors
    assert noisy_label_errors(predictions, labels, clean) == errors


def test_noisy_label_errors_nan_rows_and_empty_subsets():
    labels = torch.tensor([0, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [math.nan, 1.0]])
    errors = noisy_label_errors(logits, labels, labels, torch.empty(0, dtype=torch.int64))
    assert errors.train_error == 1 / 3  # the NaN row is wrong
    assert errors.train_error_clean == 1 / 3
    assert math.isnan(errors.train_error_noisy)
    assert math.isnan(errors.memorized_fraction)
    assert math.isnan(errors.corrected_fraction)
    assert errors.num_noisy == 0

    clean = torch.tensor([1, 0, 0])
    every = noisy_label_errors(torch.tensor([0, 1, 0]), labels, clean, torch.arange(3))
    assert math.isnan(every.train_error_clean) and every.num_clean == 0
    assert every.memorized_fraction == 2 / 3 and every.corrected_fraction == 1 / 3


def test_noisy_label_errors_against_injected_noise(noisy_data):
    train = noisy_data.train_dataset
    labels, clean, noisy = train.labels, train.clean_labels, train.noisy_indices
    assert len(noisy) == 40  # round(0.2 * 200)

    # A model that predicts the labels in use has memorised every noisy label.
    memorizer = noisy_label_errors(labels, labels, clean, noisy)
    assert (memorizer.train_error, memorizer.memorized_fraction, memorizer.corrected_fraction) == (
        0.0,
        1.0,
        0.0,
    )

    # A model that predicts the clean labels errs exactly on the injected noise.
    oracle = noisy_label_errors(clean, labels, clean, noisy)
    assert oracle.train_error == 40 / 200 == noisy_data.label_noise
    assert (oracle.train_error_clean, oracle.train_error_noisy) == (0.0, 1.0)
    assert (oracle.memorized_fraction, oracle.corrected_fraction) == (0.0, 1.0)

    # Half of the noisy examples memorised, the other half corrected.
    mixed = clean.clone()
    mixed[noisy[:20]] = labels[noisy[:20]]
    half = noisy_label_errors(mixed, labels, clean, noisy)
    assert (half.memorized_fraction, half.corrected_fraction, half.train_error) == (0.5, 0.5, 20 / 200)


def test_noisy_label_errors_rejects_bad_input():
    labels = torch.tensor([0, 1, 2])
    clean = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="`labels` differ from `clean_labels`"):
        noisy_label_errors(labels, labels, clean, torch.tensor([0]))
    with pytest.raises(ValueError, match="`noisy_indices` must lie in"):
        noisy_label_errors(labels, labels, clean, torch.tensor([3]))
    with pytest.raises(ValueError, match="distinct"):
        noisy_label_errors(labels, labels, clean, torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="`outputs`"):
        noisy_label_errors(torch.tensor([0.0, 1.0, 2.0]), labels, clean, torch.tensor([2]))
    with pytest.raises(ValueError, match="`clean_labels`"):
        noisy_label_errors(labels, labels, clean[:2], torch.tensor([2]))
    with pytest.raises(ValueError, match="boolean mask"):
        noisy_label_errors(labels, labels, clean, torch.tensor([True, False]))


# ------------------------------------------------------------------------------------------------------------
# Evaluation of a classifier.


class LookupModel(nn.Module):
    """A model built to predict known labels: the input is an example's index, the output a one-hot row."""

    def __init__(self, table: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("table", table.clone())
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 5.0 * F.one_hot(self.table[x.long()], self.num_classes).float()


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_evaluate_classifier_with_a_model_that_predicts_known_labels(noisy_data):
    train = noisy_data.train_dataset
    noisy = train.noisy_indices
    predicted = train.clean_labels.clone()
    predicted[noisy[::4]] = train.labels[noisy[::4]]  # memorise every fourth noisy example: 10 of 40
    model = LookupModel(predicted, num_classes=10)
    indices = torch.arange(200)
    batches = [
        (indices[i : i + 64], train.labels[i : i + 64], indices[i : i + 64]) for i in range(0, 200, 64)
    ]
    result = evaluate_classifier(model, batches)
    assert torch.equal(result.predictions, predicted)
    assert torch.equal(result.labels, train.labels)
    assert result.error == 30 / 200
    reference = F.cross_entropy(result.logits.double(), train.labels).item()  # float64
    assert result.loss == pytest.approx(reference, abs=0, rel=1e-7)
    errors = noisy_label_errors(result.logits, train.labels, train.clean_labels, noisy)
    assert (errors.memorized_fraction, errors.corrected_fraction) == (10 / 40, 30 / 40)
    assert (errors.train_error_clean, errors.train_error_noisy) == (0.0, 30 / 40)


def test_evaluate_classifier_matches_eval_forward_and_does_not_perturb():
    torch.manual_seed(0)
    model = SmallNet()
    model.train()
    model.head.eval()  # a mixed state, to be restored as it was
    with torch.no_grad():
        model(torch.randn(16, 4))  # non-trivial running statistics
    state = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=generator)
    y = torch.randint(0, 3, (10,), generator=generator)

    result = evaluate_classifier(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = torch.cat([reference(x[:4]), reference(x[4:])])
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=0)
    assert torch.equal(result.labels, y) and torch.equal(result.predictions, expected.argmax(1))
    assert result.loss == pytest.approx(F.cross_entropy(expected.double(), y).item(), rel=1e-6)
    assert result.error == (expected.argmax(1) != y).double().mean().item()
    assert model.training and model.body.training and model.body[1].training and not model.head.training
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

    # A shuffling DataLoader without its own generator draws from the global RNG when iterated: the global
    # state is still left as it was, and the rows are the same up to the order.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    rng = torch.get_rng_state()
    shuffled = evaluate_classifier(model, loader)
    assert torch.equal(torch.get_rng_state(), rng)
    order = shuffled.logits[:, 0].argsort()
    torch.testing.assert_close(
        shuffled.logits[order], expected[expected[:, 0].argsort()], rtol=1e-6, atol=1e-6
    )
    assert shuffled.error == result.error
    list(loader)  # without the fork the same loader moves the global RNG: the check above is meaningful
    assert not torch.equal(torch.get_rng_state(), rng)


def test_evaluate_classifier_transform_and_mse_loss():
    model = nn.Linear(2, 3).double()
    images = torch.tensor([[0, 255], [255, 0], [128, 128]], dtype=torch.uint8)
    labels = torch.tensor([0, 2, 1])

    def to_float(t: torch.Tensor) -> torch.Tensor:
        return t.double() / 255

    result = evaluate_classifier(model, [(images, labels)], transform=to_float, loss="mse")
    with torch.no_grad():
        outputs = model(images.double() / 255)
    torch.testing.assert_close(result.logits, outputs, rtol=0, atol=0)
    expected = ((outputs - F.one_hot(labels, 3).double()) ** 2).sum(dim=1).mean().item()
    assert result.loss == pytest.approx(expected, rel=EXACT)


def test_evaluate_classifier_restores_flags_on_error_and_rejects_bad_input():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)

        def forward(self, x):
            raise RuntimeError("boom")

    broken = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_classifier(broken, [(torch.zeros(1, 2), torch.tensor([0]))])
    assert broken.training and broken.inner.training

    model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="no example"):
        evaluate_classifier(model, [])
    with pytest.raises(ValueError, match="`loss`"):
        evaluate_classifier(model, [(torch.zeros(1, 2), torch.tensor([0]))], loss="hinge")
    with pytest.raises(ValueError, match="tuples or lists"):
        evaluate_classifier(model, [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="targets of a batch"):  # 2 outputs, 1 label
        evaluate_classifier(model, [(torch.zeros(2, 2), torch.tensor([0]))])
    with pytest.raises(ValueError, match="\\(batch, classes\\) outputs"):
        evaluate_classifier(nn.Flatten(0), [(torch.zeros(2, 2), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="targets of a batch"):
        evaluate_classifier(model, [(torch.zeros(1, 2), torch.tensor([0.0]))])


# ------------------------------------------------------------------------------------------------------------
# Interpolation threshold and effective model complexity.


def test_interpolation_threshold_on_lists():
    epochs = [1, 2, 5, 10, 20]
    errors = [0.6, 0.2, 0.04, 0.0, 0.0]
    assert interpolation_threshold(epochs, errors) == 10
    assert interpolation_threshold(epochs, errors, epsilon=0.05) == 5
    assert interpolation_threshold(epochs, errors, epsilon=1.0) == 1
    assert interpolation_threshold(epochs, [0.6, 0.2, 0.04, 0.01, 0.01]) is None
    assert interpolation_threshold(epochs, [0.6, math.nan, 0.0, 0.1, 0.0]) == 5  # NaN skipped, first hit kept
    result = interpolation_threshold(torch.tensor([100, 200, 300]), torch.tensor([0.5, 0.0, 0.0]))
    assert result == 200 and isinstance(result, int)
    assert interpolation_threshold([0.5, 1.5], [0.1, 0.0]) == 1.5
    with pytest.raises(ValueError, match="`steps_or_epochs` must be strictly increasing"):
        interpolation_threshold([1, 1, 2], [0.5, 0.1, 0.0])
    with pytest.raises(ValueError, match="one entry per entry"):
        interpolation_threshold([1, 2], [0.5, 0.1, 0.0])
    with pytest.raises(ValueError, match="`epsilon`"):
        interpolation_threshold([1, 2], [0.5, 0.1], epsilon=-0.1)


def test_effective_model_complexity_on_a_table():
    sizes = [500, 1000, 1000, 2000, 2000, 4000, 8000]
    errors = [0.0, 0.03125, 0.0625, 0.0625, 0.1875, 0.3, 0.5]  # means: 0, 0.046875, 0.125, 0.3, 0.5
    assert effective_model_complexity(sizes, errors, epsilon=0.1) == 1000
    assert effective_model_complexity(sizes, errors, epsilon=0.125) == 2000
    assert effective_model_complexity(sizes, errors, epsilon=0.0) == 500
    assert effective_model_complexity(sizes, errors, epsilon=0.01) == 500
    assert effective_model_complexity([1000, 2000], [0.2, 0.3], epsilon=0.1) is None
    # The maximum over all sizes, as in the definition: a later size below epsilon counts.
    assert effective_model_complexity([1000, 2000, 4000], [0.05, 0.2, 0.08], epsilon=0.1) == 4000
    # NaN runs are ignored in the mean.
    assert effective_model_complexity([1000, 1000, 2000], [0.05, math.nan, 0.3], epsilon=0.1) == 1000
    assert effective_model_complexity(torch.tensor([10, 20]), torch.tensor([0.0, 0.0])) == 20
    with pytest.raises(ValueError, match="`sizes`"):
        effective_model_complexity([0, 10], [0.0, 0.0])
    with pytest.raises(ValueError, match="`sizes`"):
        effective_model_complexity([10], [0.0, 0.0])
    with pytest.raises(ValueError, match="`epsilon`"):
        effective_model_complexity([10], [0.0], epsilon=math.inf)


# ------------------------------------------------------------------------------------------------------------
# Peaks.

GRID = torch.linspace(0.0, 1.0, 61, dtype=torch.float64)
STEP = 1.0 / 60


def descending(x: torch.Tensor) -> torch.Tensor:
    return 0.1 + 0.8 * torch.exp(-3.0 * x)


def bump(x: torch.Tensor, center: float, height: float = 0.25, width: float = 0.06) -> torch.Tensor:
    return height * torch.exp(-((x - center) ** 2) / (2 * width**2))


def noise(seed: int, sigma: float) -> torch.Tensor:
    return sigma * torch.randn(len(GRID), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_find_peaks_small_exact_example_against_scipy():
    curve = [5.0, 4.0, 3.0, 2.0, 3.0, 4.0, 3.0, 3.5, 2.0, 1.0, 0.0]
    positions = [10 * i for i in range(len(curve))]
    peaks = find_peaks(curve, positions, smoothing=None, min_prominence=0.0, noise_factor=0.0)
    # Index 5: height 4, nothing higher on the right: valleys 2 (left, index 3) and 0 (right, the end): 4 - 2.
    # Index 7: height 3.5, higher ground at index 5 on the left, valley 3 there; right valley 0: 3.5 - 3.
    assert [(p.index, p.position, p.height, p.prominence) for p in peaks] == [
        (5, 50, 4.0, 2.0),
        (7, 70, 3.5, 0.5),
    ]
    assert (peaks[0].left_base, peaks[0].right_base) == (30, 100)
    assert (peaks[1].left_base, peaks[1].right_base) == (60, 100)
    from scipy import signal  # a test dependency (the `dev` extra): a missing scipy fails, it does not skip

    prominences, left_bases, right_bases = signal.peak_prominences(curve, [p.index for p in peaks])
    assert [p.prominence for p in peaks] == prominences.tolist() == [2.0, 0.5]
    bases = [(positions[int(left)], positions[int(right)]) for left, right in zip(left_bases, right_bases)]
    assert bases == [(30, 100), (60, 100)]
    # A threshold of 0.2 relative to the range 5 (1 absolute) keeps only the first; 0.1 (0.5) keeps both.
    assert [p.index for p in find_peaks(curve, smoothing=None, min_prominence=0.2, noise_factor=0.0)] == [5]
    assert len(find_peaks(curve, smoothing=None, min_prominence=0.1, noise_factor=0.0)) == 2


def test_find_peaks_without_thresholds_is_scipy_on_random_curves():
    """With smoothing and every threshold off, the peaks are ``scipy.signal.find_peaks``'s, with its
    prominences and bases: on random Gaussian curves and on integer curves full of ties and plateaus (without
    smoothing a plateau's points have equal raw values and it is reported at its first; scipy at its middle,
    so scipy's ``left_edges`` are compared)."""
    from scipy import signal

    generator = torch.Generator().manual_seed(0)
    plateaus = 0
    for trial in range(100):
        n = int(torch.randint(3, 40, (1,), generator=generator))
        if trial % 2:
            curve = torch.randint(0, 6, (n,), generator=generator).double().tolist()
        else:
            curve = torch.randn(n, generator=generator, dtype=torch.float64).tolist()
        peaks = find_peaks(
            curve, smoothing=None, min_prominence=0.0, noise_factor=0.0, require_descent_before=False
        )
        _, found = signal.find_peaks(curve, prominence=0.0, plateau_size=1)
        expected = list(
            zip(
                found["left_edges"].tolist(),
                found["prominences"].tolist(),
                found["left_bases"].tolist(),
                found["right_bases"].tolist(),
            )
        )
        assert [(p.index, p.prominence, p.left_base, p.right_base) for p in peaks] == expected, curve
        plateaus += int((found["plateau_sizes"] > 1).sum())
    assert plateaus > 20  # the integer curves did exercise plateaus


def test_find_peaks_one_noisy_double_descent_peak():
    clean = descending(GRID) + bump(GRID, 0.45)
    (truth,) = find_peaks(clean, GRID, smoothing=None, min_prominence=0.0, noise_factor=0.0)
    assert abs(truth.position - 0.45) < 2 * STEP  # the descending trend shifts the top a little to the left
    for seed in range(10):
        peaks = find_peaks(clean + noise(seed, 0.01), GRID)
        assert len(peaks) == 1, (seed, peaks)
        assert abs(peaks[0].position - truth.position) <= 3 * STEP, (seed, peaks)
        assert abs(peaks[0].prominence - truth.prominence) < 0.03
        assert peaks[0].left_base < peaks[0].position < peaks[0].right_base


def test_find_peaks_with_a_known_noise_level_uses_it_as_the_floor():
    # Prominence exactly 0.03 (0.47 - 0.44), range 0.32; n = 10 points, sqrt(2 ln 10) = 2.1460.
    curve = [0.62, 0.49, 0.44, 0.457, 0.47, 0.451, 0.41, 0.37, 0.32, 0.30]
    floor = 1.25 * math.sqrt(2 * math.log(10))
    (peak,) = find_peaks(curve, smoothing=None, noise_level=0.03 / floor - 1e-6)
    assert (peak.index, peak.left_base, peak.right_base) == (4, 2, 9)
    assert peak.prominence == pytest.approx(0.03, abs=1e-12)
    assert find_peaks(curve, smoothing=None, noise_level=0.03 / floor + 1e-6) == []
    # min_prominence still applies: 0.05 x 0.32 = 0.016 < 0.03 keeps it, 0.1 x 0.32 = 0.032 drops it.
    assert len(find_peaks(curve, smoothing=None, noise_level=0.0, min_prominence=0.09)) == 1
    assert find_peaks(curve, smoothing=None, noise_level=0.0, min_prominence=0.1) == []
    with pytest.raises(ValueError, match="noise_level"):
        find_peaks(curve, noise_level=-0.01)


def test_find_peaks_standard_errors_set_the_floor_of_each_comparison():
    """``noise_factor sqrt(2 ln n) sqrt((e_i^2 + e_j^2) / 2)`` between the two points a comparison subtracts:
    the peak and its higher base for the prominence, the top of the first descent and the left base for the
    descent; equal standard errors everywhere are ``noise_level``."""
    # Peak at index 4 (0.47), bases at 2 (0.44, the higher) and 9 (0.30): prominence 0.03; the descent before
    # it runs from index 0 (0.62) to 2: 0.18. n = 10 points.
    curve = [0.62, 0.49, 0.44, 0.457, 0.47, 0.451, 0.41, 0.37, 0.32, 0.30]
    floor = 1.25 * math.sqrt(2 * math.log(10))
    for delta, found in ((-1e-6, 1), (1e-6, 0)):
        sigma = 0.03 / floor + delta
        assert len(find_peaks(curve, smoothing=None, standard_errors=[sigma] * 10)) == found
        assert len(find_peaks(curve, smoothing=None, noise_level=sigma)) == found
        # only the peak's and its higher base's count for the prominence: the root mean square of the two
        errors = [0.0] * 10
        errors[4], errors[2] = 0.0, math.sqrt(2) * sigma
        errors[9] = errors[7] = 1.0  # the lower base and a point on the way down: no part in it
        assert len(find_peaks(curve, smoothing=None, standard_errors=errors)) == found
        errors[4], errors[2] = sigma, sigma
        assert len(find_peaks(curve, smoothing=None, standard_errors=errors)) == found
        # the descent: its top (index 0) and the left base
        errors = [0.0] * 10
        errors[0] = math.sqrt(2) * (0.18 / floor + delta)
        assert len(find_peaks(curve, smoothing=None, standard_errors=errors)) == found
        assert (
            len(find_peaks(curve, smoothing=None, standard_errors=errors, require_descent_before=False)) == 1
        )
    (peak,) = find_peaks(curve, smoothing=None, standard_errors=[0.0] * 10)
    assert (peak.index, peak.left_base, peak.right_base) == (4, 2, 9)
    assert peak.prominence == pytest.approx(0.03, abs=1e-12)
    # a plateau (indices 3 to 5, prominence 1 over the left base at index 2) is held to its largest one
    plateau = [3.0, 2.0, 1.0, 2.0, 2.0, 2.0, 1.0, 0.0]
    floor = 1.25 * math.sqrt(2 * math.log(8))
    for delta, found in ((-1e-6, 1), (1e-6, 0)):
        errors = [0.0] * 8
        errors[5] = math.sqrt(2) * (1.0 / floor + delta)
        assert len(find_peaks(plateau, smoothing=None, standard_errors=errors)) == found


def test_find_peaks_standard_errors_through_the_smoothing():
    """The moving median's value is one raw point's: its standard error is that point's (a spike's huge one
    does not count when the median drops the spike); the moving mean's is the root mean square over the
    window, in units of one raw point."""
    curve = [5.0, 4.0, 3.0, 2.0, 3.0, 9.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    # median of 3: 5 4 3 3 3 4 4 3 2 1 0; a plateau of 4 at indices 5, 6 (the raw 4 at index 6 both times),
    # left base index 4 (the raw 3 at index 4), right base the end: prominence 1; descent 5 - 3 = 2.
    floor = 1.25 * math.sqrt(2 * math.log(11))
    errors = [0.0] * 11
    errors[5] = 100.0  # the spike
    (peak,) = find_peaks(curve, standard_errors=errors)
    assert (peak.index, peak.height, peak.prominence, peak.left_base) == (5, 4.0, 1.0, 4)
    for delta, found in ((-1e-6, 1), (1e-6, 0)):
        errors[6] = math.sqrt(2) * (1.0 / floor + delta)
        assert len(find_peaks(curve, standard_errors=errors)) == found
    errors = [0.0] * 11
    errors[4] = math.sqrt(2) * (2.0 / floor + 1e-6)  # the left base's raw point: its descent goes
    assert find_peaks(curve, standard_errors=errors) == []
    errors[4] = math.sqrt(2) * (1.0 / floor - 1e-6)  # and the prominence (1) just holds
    assert len(find_peaks(curve, standard_errors=errors, require_descent_before=False)) == 1

    curve = [6.0, 5.0, 4.0, 3.0, 2.0, 3.0, 5.0, 3.0, 2.0, 1.0, 0.0, -1.0]
    # mean of 3: ... 3, 8/3, 10/3, 11/3, 10/3, 2 ...; peak at index 6, left base 4: prominence 1. A standard
    # error e at raw index 7 (in the peak's window, not the base's) gives the peak e / sqrt(3).
    floor = 1.25 * math.sqrt(2 * math.log(12))
    (peak,) = find_peaks(curve, smoothing="mean", standard_errors=[0.0] * 12)
    assert (peak.index, peak.left_base, peak.prominence) == (6, 4, pytest.approx(1.0, abs=1e-12))
    for delta, found in ((-1e-6, 1), (1e-6, 0)):
        errors = [0.0] * 12
        errors[7] = math.sqrt(6) * (1.0 / floor + delta)
        assert len(find_peaks(curve, smoothing="mean", standard_errors=errors)) == found
        sigma = 1.0 / floor + delta  # equal standard errors: the floor of noise_level
        assert len(find_peaks(curve, smoothing="mean", standard_errors=[sigma] * 12)) == found
        assert len(find_peaks(curve, smoothing="mean", noise_level=sigma)) == found


def test_find_peaks_rejects_bad_standard_errors():
    curve = [1.0, 0.5, 0.8, 0.3]
    with pytest.raises(
        ValueError, match="`standard_errors` must have one entry per entry of `values` \\(4\\), got 3"
    ):
        find_peaks(curve, standard_errors=[0.1, 0.1, 0.1])
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="`standard_errors` must be finite and >= 0"):
            find_peaks(curve, standard_errors=[0.1, bad, 0.1, 0.1])
    with pytest.raises(ValueError, match="`standard_errors`"):
        find_peaks(curve, standard_errors=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="`standard_errors`"):
        find_peaks(curve, standard_errors="0.1")
    with pytest.raises(ValueError, match="`noise_level`.*`standard_errors`"):
        find_peaks(curve, noise_level=0.1, standard_errors=[0.1] * 4)
    # where the value is NaN or Inf (dropped), so may its standard error be; a tensor works like a list
    curve = [1.0, 0.5, math.nan, 0.8, 0.3, math.inf, 0.2]
    errors = [0.01, 0.01, math.nan, 0.01, 0.01, -1.0, 0.01]
    assert find_peaks(curve, smoothing=None, standard_errors=errors) == find_peaks(
        curve, smoothing=None, standard_errors=torch.tensor([0.01] * 7)
    )
    assert len(find_peaks(curve, smoothing=None, standard_errors=errors)) == 1


def test_find_peaks_none_on_a_monotone_noisy_curve():
    for seed in range(20):
        assert find_peaks(descending(GRID) + noise(seed, 0.02), GRID) == [], seed
        assert find_peaks(descending(GRID) + noise(seed, 0.02), GRID, smoothing="mean", window=5) == [], seed
    # Noise as large as a fifth of the curve's range, which the relative threshold alone would not absorb.
    for seed in range(20):
        assert find_peaks(descending(GRID) + noise(seed, 0.15), GRID) == [], seed


def test_find_peaks_two_bumps():
    clean = descending(GRID) + bump(GRID, 0.3, height=0.3) + bump(GRID, 0.7)
    truths = find_peaks(clean, GRID, smoothing=None, min_prominence=0.0, noise_factor=0.0)
    assert len(truths) == 2
    for seed in range(10):
        peaks = find_peaks(clean + noise(seed, 0.01), GRID)
        assert len(peaks) == 2, (seed, peaks)
        for peak, truth in zip(peaks, truths):
            assert abs(peak.position - truth.position) <= 3 * STEP, (seed, peaks)


def test_find_peaks_is_nan_safe_and_reports_raw_indices():
    curve = (descending(GRID) + bump(GRID, 0.45) + noise(0, 0.01)).tolist()
    reference = find_peaks(curve, GRID)
    for i in (0, 5, 40, 60):
        curve[i] = math.nan
    curve[10] = math.inf
    peaks = find_peaks(curve, GRID)
    assert len(peaks) == 1
    assert peaks[0].index == reference[0].index
    assert peaks[0].position == GRID[peaks[0].index].item()
    assert find_peaks([math.nan] * 5) == []
    assert find_peaks([1.0, math.nan, 2.0, math.nan]) == []


def test_find_peaks_requires_a_first_descent_and_handles_plateaus_and_spikes():
    hump = [0.1, 0.3, 0.5, 0.7, 0.5, 0.3, 0.1]  # rises from the start: no descent before the peak
    assert find_peaks(hump, smoothing=None, noise_factor=0.0) == []
    assert find_peaks(hump, smoothing=None, min_prominence=0.0, noise_factor=0.0) == []
    (peak,) = find_peaks(hump, smoothing=None, noise_factor=0.0, require_descent_before=False)
    assert (peak.index, peak.prominence) == (3, pytest.approx(0.6))

    plateau = [3.0, 2.0, 1.0, 2.0, 2.0, 2.0, 1.0, 0.0]
    (peak,) = find_peaks(plateau, smoothing=None, noise_factor=0.0)
    assert (peak.index, peak.height, peak.prominence) == (3, 2.0, 1.0)

    spiky = descending(GRID).clone()
    spiky[30] += 0.3  # a single outlier: the moving median removes it, no smoothing sees a peak
    assert find_peaks(spiky, GRID) == []
    assert [p.index for p in find_peaks(spiky, GRID, smoothing=None, noise_factor=0.0)] == [30]

    assert find_peaks([1.0, 1.0, 1.0, 1.0]) == []  # flat
    assert find_peaks([1.0, 2.0]) == []  # too short


def test_find_peaks_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`window` must be odd"):
        find_peaks([1.0, 2.0, 1.0], window=4)
    with pytest.raises(ValueError, match="`window`"):
        find_peaks([1.0, 2.0, 1.0], window=0)
    with pytest.raises(ValueError, match="`smoothing`"):
        find_peaks([1.0, 2.0, 1.0], smoothing="gaussian")
    with pytest.raises(ValueError, match="`positions` must be strictly increasing"):
        find_peaks([1.0, 2.0, 1.0], [0, 2, 1])
    with pytest.raises(ValueError, match="`values`"):
        find_peaks(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`min_prominence`"):
        find_peaks([1.0, 2.0, 1.0], min_prominence=-1.0)
    with pytest.raises(ValueError, match="`noise_factor`"):
        find_peaks([1.0, 2.0, 1.0], noise_factor=math.nan)


# ------------------------------------------------------------------------------------------------------------
# Disjoint splits.


def test_disjoint_splits_are_disjoint_equal_and_deterministic():
    rng = torch.get_rng_state()
    splits = disjoint_splits(103, 4, generator=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [len(s) for s in splits] == [25] * 4
    union = torch.cat(splits)
    assert len(set(union.tolist())) == 100 and int(union.min()) >= 0 and int(union.max()) < 103
    assert all(torch.equal(s, s.sort().values) and s.dtype == torch.int64 for s in splits)
    again = disjoint_splits(103, 4, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(splits, again))
    other = disjoint_splits(103, 4, generator=8)
    assert not all(torch.equal(a, b) for a, b in zip(splits, other))
    with pytest.raises(ValueError, match="`m`"):
        disjoint_splits(10, 1, generator=0)
    with pytest.raises(ValueError, match="`m`"):
        disjoint_splits(3, 4, generator=0)
    with pytest.raises(ValueError, match="`generator`"):
        disjoint_splits(10, 2, generator=None)


# ------------------------------------------------------------------------------------------------------------
# Bias and variance: squared error.


def test_mse_bias_variance_hand_computed():
    # Model 1 and 2 on x1 (label 0) and x2 (label 2), three classes.
    predictions = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]],
            [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]],
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 2])
    # variance: x1: mean (.5, .5, 0), deviations sum to 2 * 0.5 = 1, / (m - 1) = 1; x2: 0 -> 0.5
    # risk: x1: 0 and 2; x2: 1.5 and 1.5 -> 5 / 4; bias^2 = 1.25 - 0.5 = 0.75
    result = mse_bias_variance(predictions, labels)
    assert (result.risk.item(), result.bias_squared.item(), result.variance.item()) == (1.25, 0.75, 0.5)
    one_hot = F.one_hot(labels, 3).double()
    assert mse_bias_variance(predictions, one_hot) == result


def test_mse_bias_variance_identities():
    generator = torch.Generator().manual_seed(0)
    m = 5
    predictions = torch.rand(m, 40, 10, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (40,), generator=generator)
    result = mse_bias_variance(predictions, labels)
    assert abs(result.risk - result.bias_squared - result.variance) < EXACT
    # bias^2 = mean_x ||y - mean f||^2 - variance / m (the plug-in bias overestimates by variance / m).
    y = F.one_hot(labels, 10).double()
    plug_in_bias = ((predictions.mean(0) - y) ** 2).sum(-1).mean()
    torch.testing.assert_close(result.bias_squared, plug_in_bias - result.variance / m, rtol=EXACT, atol=0)
    # Variance against torch.var (unbiased), summed over classes and averaged over points.
    torch.testing.assert_close(result.variance, predictions.var(dim=0).sum(-1).mean(), rtol=EXACT, atol=0)

    # All models agreeing: no variance, and the bias is the risk.
    same = predictions[:1].expand(4, -1, -1).clone()
    agree = mse_bias_variance(same, labels)
    assert agree.variance.item() == 0.0
    assert agree.bias_squared.item() == agree.risk.item()

    # k partitions: the mean of the per-partition estimates.
    stacked = torch.rand(3, m, 40, 10, generator=generator, dtype=torch.float64)
    parts = [mse_bias_variance(stacked[i], labels) for i in range(3)]
    combined = mse_bias_variance(stacked, labels)
    for field in BiasVariance._fields:
        expected = torch.stack([getattr(p, field) for p in parts]).mean()
        torch.testing.assert_close(getattr(combined, field), expected, rtol=EXACT, atol=EXACT)


def test_mse_variance_is_unbiased_for_least_squares_with_gaussian_noise():
    """Fixed-design least squares, y = X w + sigma * noise: a model trained on one draw of the noise predicts
    x^T w_hat with Var = sigma^2 x^T (X^T X)^-1 x and no bias. The estimator, averaged over many partitions
    into m = 2 models, must match the closed form (the plug-in, dividing by m, would give half of it)."""
    generator = torch.Generator().manual_seed(0)
    n, d, num_test, m, repeats, sigma = 12, 3, 6, 2, 20000, 0.5
    X = torch.randn(n, d, generator=generator, dtype=torch.float64)
    X_test = torch.randn(num_test, d, generator=generator, dtype=torch.float64)
    w = torch.randn(d, generator=generator, dtype=torch.float64)
    solve = torch.linalg.solve(X.T @ X, X.T)  # (d, n)
    noise_draws = sigma * torch.randn(repeats, m, n, generator=generator, dtype=torch.float64)
    w_hat = (X @ w + noise_draws) @ solve.T  # (repeats, m, d)
    predictions = (w_hat @ X_test.T).unsqueeze(-1)  # (repeats, m, num_test, 1)
    targets = (X_test @ w).unsqueeze(-1)  # noise-free test targets: bias^2 = 0

    result = mse_bias_variance(predictions, targets)
    closed_form = sigma**2 * torch.einsum("id,de,ie->i", X_test, torch.linalg.inv(X.T @ X), X_test).mean()
    per_partition = predictions.var(dim=1).sum(-1).mean(-1)  # (repeats,)
    standard_error = per_partition.std() / math.sqrt(repeats)
    torch.testing.assert_close(result.variance, per_partition.mean(), rtol=EXACT, atol=0)
    assert abs(result.variance - closed_form) < 4 * standard_error
    assert abs(result.variance * (m - 1) / m - closed_form) > 20 * standard_error  # the biased plug-in
    bias_per_partition = (predictions - targets).pow(2).sum(-1).mean(dim=(1, 2)) - per_partition
    assert abs(result.bias_squared) < 4 * bias_per_partition.std() / math.sqrt(repeats)


def test_mse_bias_variance_rejects_bad_input():
    with pytest.raises(ValueError, match="m >= 2"):
        mse_bias_variance(torch.zeros(1, 3, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="`predictions`"):
        mse_bias_variance(torch.zeros(3, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="`targets`"):
        mse_bias_variance(torch.zeros(2, 3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="`targets`"):
        mse_bias_variance(torch.zeros(2, 3, 2), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------------------------
# Bias and variance: cross-entropy.


def reference_cross_entropy_decomposition(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, ...]:
    """Risk, bias and variance from probabilities, with explicit loops (float64), for (m, N, C) logits."""
    probabilities = logits.softmax(-1)
    m, n, c = probabilities.shape
    risk = bias = variance = 0.0
    for i in range(n):
        geometric = torch.ones(c, dtype=torch.float64)
        for j in range(m):
            geometric = geometric * probabilities[j, i] ** (1.0 / m)
        geometric = geometric / geometric.sum()
        y = targets[i]
        bias += sum(float(y[a] * math.log(y[a] / geometric[a])) for a in range(c) if y[a] > 0) / n
        for j in range(m):
            q = probabilities[j, i]
            risk += sum(float(y[a] * math.log(y[a] / q[a])) for a in range(c) if y[a] > 0) / (n * m)
            variance += float((geometric * (geometric / q).log()).sum()) / (n * m)
    return risk, bias, variance


def test_cross_entropy_bias_variance_hand_computed():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]], dtype=torch.float64)
    result = cross_entropy_bias_variance(logits, torch.tensor([0]))
    risk = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0))) / 2  # mean of -log sigmoid(+-2)
    assert result.bias_squared.item() == pytest.approx(math.log(2.0), rel=EXACT)  # geometric mean (1/2, 1/2)
    assert result.risk.item() == pytest.approx(risk, rel=EXACT)
    assert result.variance.item() == pytest.approx(risk - math.log(2.0), rel=EXACT)


def test_cross_entropy_bias_variance_against_reference_and_identity():
    generator = torch.Generator().manual_seed(1)
    logits = 3.0 * torch.randn(4, 12, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (12,), generator=generator)
    soft = torch.rand(12, 5, generator=generator, dtype=torch.float64)
    soft[:, 0] = 0.0  # a class with zero target probability
    soft = soft / soft.sum(-1, keepdim=True)
    for targets in (labels, soft):
        result = cross_entropy_bias_variance(logits, targets)
        assert abs(result.risk - result.bias_squared - result.variance) < EXACT
        dense = F.one_hot(targets, 5).double() if targets.ndim == 1 else targets
        reference = reference_cross_entropy_decomposition(logits, dense)
        for value, expected in zip(result, reference):
            assert value.item() == pytest.approx(expected, rel=1e-10, abs=EXACT)
    # With one-hot targets the risk is the models' mean cross-entropy.
    result = cross_entropy_bias_variance(logits, labels)
    mean_ce = torch.stack([F.cross_entropy(logits[j], labels) for j in range(4)]).mean()
    torch.testing.assert_close(result.risk, mean_ce, rtol=EXACT, atol=0)
    # The variance is -mean log Z, Z the normaliser of the geometric mean.
    log_z = torch.logsumexp(logits.log_softmax(-1).mean(0), dim=-1)
    torch.testing.assert_close(result.variance, -log_z.mean(), rtol=1e-10, atol=EXACT)
    # Log-probabilities give the same as logits.
    again = cross_entropy_bias_variance(logits.log_softmax(-1), labels)
    for a, b in zip(again, result):
        torch.testing.assert_close(a, b, rtol=EXACT, atol=EXACT)


def test_cross_entropy_bias_variance_when_models_agree_and_bad_input():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 8, 4, generator=generator, dtype=torch.float64).expand(3, -1, -1)
    labels = torch.randint(0, 4, (8,), generator=generator)
    result = cross_entropy_bias_variance(logits, labels)
    assert abs(result.variance.item()) < EXACT
    torch.testing.assert_close(result.bias_squared, F.cross_entropy(logits[0], labels), rtol=EXACT, atol=0)
    with pytest.raises(ValueError, match="m >= 2"):
        cross_entropy_bias_variance(logits[:1], labels)
    with pytest.raises(ValueError, match="`logits`"):
        cross_entropy_bias_variance(torch.zeros(2, 8, 4, dtype=torch.int64), labels)


def test_cross_entropy_plug_in_variance_is_low_by_m_minus_one_over_m_for_close_models():
    """The documented bias of the plug-in estimate: logits scattered by small Gaussian noise around a common
    centre; the variance estimated from m models, averaged over many partitions, is (m - 1) / m of the
    variance estimated from many models."""
    generator = torch.Generator().manual_seed(3)
    centre = torch.randn(1, 1, 20, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (20,), generator=generator)

    def estimate(m: int, repeats: int) -> float:
        logits = centre + 0.1 * torch.randn(repeats, m, 20, 5, generator=generator, dtype=torch.float64)
        return cross_entropy_bias_variance(logits, labels).variance.item()

    many = estimate(64, 100)
    assert estimate(2, 2000) / many == pytest.approx(1 / 2, rel=0.05)
    assert estimate(4, 1000) / many == pytest.approx(3 / 4, rel=0.05)
