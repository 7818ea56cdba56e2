"""find_peaks on curves whose peaks are known (issue #15): the closed-form risk of ridgeless least squares, a
simulated min-norm random-ReLU-features regression, and curves without a peak.

References: the limiting risk of min-norm least squares with isotropic features (Hastie, Montanari, Rosset &
Tibshirani 2019, "Surprises in high-dimensional ridgeless least squares interpolation", Theorem 1), infinite
at gamma = p / n = 1 and evaluated on a geometric grid that avoids 1; the same with the features ordered by
importance and only the first p observed (the unobserved ones act as noise), which descends before the peak;
random ReLU features fitted by ``torch.linalg.lstsq`` (min-norm) and averaged over seeds, as in Belkin, Hsu,
Ma & Mandal (PNAS 2019); noise-free monotone curves, and seeded noisy curves against the false-peak rate the
module docstring states.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lt_theory.measures.risk import _noise_level, find_peaks


def isotropic_risk(gamma: float, signal: float, noise: float) -> float:
    """HMRT Theorem 1: the limiting excess test risk of min-norm least squares, p / n -> gamma, isotropic
    features, ``signal`` = ||beta||^2 (r^2), ``noise`` = sigma^2."""
    if gamma < 1:
        return noise * gamma / (1 - gamma)
    return signal * (1 - 1 / gamma) + noise / (gamma - 1)


def misspecified_risk(gamma: float, noise: float, c: float) -> float:
    """The test risk when the features are ordered by importance, the first p = gamma n of them carry the
    fraction gamma / (gamma + c) of a total signal 1, and only those are observed: the unobserved part
    theta^2 = c / (gamma + c) is independent Gaussian noise to the fit and adds theta^2 to the test error, so
    Theorem 1 applies with r^2 = 1 - theta^2 and sigma^2 + theta^2 (checked against a simulation with
    n = 200: 0.605 / 0.611 at gamma = 0.1, 1.071 / 1.071 at gamma = 2)."""
    theta2 = c / (gamma + c)
    return theta2 + isotropic_risk(gamma, 1 - theta2, noise + theta2)


def gamma_grid(points: int) -> list[float]:
    """A geometric grid from 0.105 to 10.5: its point nearest 1 is 1.05 (the middle one), never 1 itself."""
    return [1.05 * 10 ** (-1 + 2 * k / (points - 1)) for k in range(points)]


def nearest_one(gammas: list[float]) -> int:
    return min(range(len(gammas)), key=lambda k: abs(math.log(gammas[k])))


# ------------------------------------------------------------------------------------------------------------
# (a) The closed-form risk of ridgeless least squares.


@pytest.mark.parametrize("points", [13, 17, 21, 31, 41])
@pytest.mark.parametrize(("signal", "noise"), [(1.0, 1.0), (0.5, 1.0), (1.0, 4.0)])
def test_isotropic_ridgeless_risk_has_one_peak_at_the_grid_point_nearest_gamma_one(points, signal, noise):
    """Theorem 1's risk rises from 0 to infinity below gamma = 1 and, with r^2 <= sigma^2, falls for all
    gamma > 1: one peak, at the grid point nearest 1, between the first point and the last. It has no first
    descent, so the defaults (which ask for one) report nothing; without that requirement it is found."""
    gammas = gamma_grid(points)
    risk = [isotropic_risk(g, signal, noise) for g in gammas]
    (peak,) = find_peaks(risk, gammas, require_descent_before=False)
    assert peak.index == nearest_one(gammas) == (points - 1) // 2
    assert peak.value == risk[peak.index] == max(risk)
    assert (peak.left_base, peak.right_base) == (gammas[0], gammas[-1])
    assert find_peaks(risk, gammas) == []


@pytest.mark.parametrize("points", [13, 15, 17, 19, 21, 25, 31, 41])
def test_ridgeless_risk_with_unobserved_features_has_one_peak_with_default_arguments(points):
    """The textbook curve: the risk falls a little (the observed features capture more of the signal), rises
    more than tenfold at gamma = 1 and falls again. The defaults find it, at the grid point nearest 1, on
    every grid; the MAD of all second differences (the estimate before issue #15) is inflated by the peak's
    and missed it on the grids of 21 points and fewer."""
    gammas = gamma_grid(points)
    risk = [misspecified_risk(g, noise=0.5, c=0.1) for g in gammas]
    near = nearest_one(gammas)
    lowest_before = min(risk[:near])
    assert lowest_before < risk[0] < 1.15 * lowest_before  # a small first descent
    assert risk[near] > 10 * lowest_before and risk[-1] < risk[near] / 10
    (peak,) = find_peaks(risk, gammas)
    assert peak.index == near
    assert peak.left_base < 1 < peak.right_base


# ------------------------------------------------------------------------------------------------------------
# (b) Min-norm regression on random ReLU features, averaged over seeds.

TRAIN = 100
WIDTHS = [round(10 ** (1 + k / 8)) for k in range(17)]  # 10 to 1000, geometric, with p = n = 100 at k = 8
SEEDS = range(60, 80)


def random_features_test_risk(seed: int, dim: int = 20, label_noise: float = 0.4) -> list[float]:
    """Test MSE against the clean teacher of the min-norm least-squares fit of ``TRAIN`` noisy labels on the
    first p of 1000 random ReLU features relu(W x), W ~ N(0, 1/dim), for each p in WIDTHS (float64)."""
    teacher = torch.randn(dim, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    teacher = teacher / teacher.norm()  # one fixed teacher: y = tanh(2 <u, x>) + noise

    def target(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(2 * x @ teacher)

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TRAIN, dim, generator=generator, dtype=torch.float64)
    x_test = torch.randn(2000, dim, generator=generator, dtype=torch.float64)
    y = target(x) + label_noise * torch.randn(TRAIN, generator=generator, dtype=torch.float64)
    w = torch.randn(max(WIDTHS), dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    features, test_features = torch.relu(x @ w.T), torch.relu(x_test @ w.T)
    risks = []
    for p in WIDTHS:
        coefficients = torch.linalg.lstsq(features[:, :p], y[:, None], driver="gelsd").solution[:, 0]
        risks.append(float(((test_features[:, :p] @ coefficients - target(x_test)) ** 2).mean()))
    return risks


@pytest.fixture(scope="module")
def random_features_curve() -> tuple[list[float], list[float]]:
    """Mean test risk over 20 seeds and its standard error, per width."""
    runs = torch.tensor([random_features_test_risk(seed) for seed in SEEDS], dtype=torch.float64)
    return runs.mean(0).tolist(), (runs.std(0) / math.sqrt(len(SEEDS))).tolist()


def test_min_norm_random_features_risk_has_one_peak_at_p_equals_n(random_features_curve):
    """Belkin et al.'s experiment on a synthetic teacher: the mean test risk falls a little, rises more than a
    hundredfold at p = n and falls below its first minimum. One peak, at p = 100, with the defaults and with
    the standard errors of the mean. (On ten blocks of 20 seeds, 0 to 199, both find it every time; the plain
    MAD estimate of before issue #15 missed it on five blocks, this one among them.)"""
    risk, errors = random_features_curve
    at = WIDTHS.index(TRAIN)
    first_minimum = min(risk[:at])
    assert 0.05 < risk[0] - first_minimum < 0.5 * risk[0]
    assert risk[at] > 100 * first_minimum and risk[-1] < first_minimum
    for peaks in (find_peaks(risk, WIDTHS), find_peaks(risk, WIDTHS, standard_errors=errors)):
        assert [peak.position for peak in peaks] == [TRAIN], peaks
        assert peaks[0].left_base < TRAIN < peaks[0].right_base


def test_standard_errors_decide_whether_the_first_descent_counts(random_features_curve):
    """The same mean curve with its standard errors scaled up: once the first descent is within the noise of
    its two ends, the peak is not a double descent. It goes at the factor the floor predicts: the descent over
    noise_factor sqrt(2 ln n) times the root mean square of the standard errors of its top and of its bottom
    (here the first point, kept as it is by the smoothing, and the left base, where the moving median picks
    the raw value at width 32)."""
    risk, errors = random_features_curve
    (peak,) = find_peaks(risk, WIDTHS, standard_errors=errors)
    at = WIDTHS.index(peak.left_base)
    assert (peak.left_base, statistics.median(risk[at - 1 : at + 2])) == (32, risk[at])
    assert risk[0] == max(risk[: at + 1])  # the top of the first descent, smoothed or not
    floor = 1.25 * math.sqrt(2 * math.log(len(risk))) * math.sqrt((errors[0] ** 2 + errors[at] ** 2) / 2)
    ratio = (risk[0] - risk[at]) / floor
    assert 1.2 < ratio < 5
    # the prominence (0.8, against the larger standard errors near the peak) is not what decides here
    assert [
        p.position for p in find_peaks(risk, WIDTHS, standard_errors=[0.99 * ratio * e for e in errors])
    ] == [TRAIN]
    assert find_peaks(risk, WIDTHS, standard_errors=[1.01 * ratio * e for e in errors]) == []
    assert [
        p.position for p in find_peaks(risk, WIDTHS, standard_errors=errors, require_descent_before=False)
    ] == [TRAIN]


# ------------------------------------------------------------------------------------------------------------
# The noise estimate.


def test_noise_estimate_leaves_out_the_neighbourhood_of_a_large_peak():
    """The formula on a hand-built curve, and its purpose: a sharp peak on noise leaves the estimate where the
    noise alone puts it, in the median over seeds (the MAD of all second differences grows by a third)."""
    curve = [1.0, 0.9, 0.82, 0.75, 0.71, 0.66, 0.64, 0.6, 9.0, 0.58, 0.5, 0.47, 0.43, 0.42, 0.4]
    second = [curve[i - 1] - 2 * curve[i] + curve[i + 1] for i in range(1, len(curve) - 1)]
    # +8.44, -16.82, +8.34 around the peak (index 8, second differences 6..8) are far outside; so are their
    # neighbours' stencils, second differences 5 and 9
    rest = second[:5] + second[10:]
    center = statistics.median(rest)
    expected = 1.4826 * statistics.median([abs(d - center) for d in rest]) / math.sqrt(6)
    assert _noise_level(curve) == pytest.approx(expected, rel=1e-12)
    center = statistics.median(second)
    plain = 1.4826 * statistics.median([abs(d - center) for d in second]) / math.sqrt(6)
    assert plain > 1.5 * expected  # twice as large, in fact

    x = torch.linspace(0, 1, 41, dtype=torch.float64)
    peak = 0.02 / (torch.abs(x - 0.5) + 0.002)  # 10 at the centre, 0.22 two points away
    peak = peak - peak.min()
    ratios = []
    for seed in range(100):
        noisy = (
            0.3
            + 0.5 * torch.exp(-2 * x)
            + 0.01 * torch.randn(41, generator=torch.Generator().manual_seed(seed))
        )
        ratios.append(_noise_level((noisy + peak).tolist()) / _noise_level(noisy.tolist()))
    assert 0.9 < statistics.median(ratios) < 1.1  # the plain MAD's median ratio is 1.3 on these draws


# ------------------------------------------------------------------------------------------------------------
# (c) Curves without a peak.


def test_no_peak_on_noise_free_monotone_curves():
    generator = torch.Generator().manual_seed(0)
    for trial in range(100):
        n = int(torch.randint(3, 80, (1,), generator=generator))
        steps = torch.rand(n, generator=generator, dtype=torch.float64) ** 3  # some near-flat stretches
        steps[torch.rand(n, generator=generator) < 0.3] = 0.0  # and exactly flat ones
        curve = (10 - steps.cumsum(0)).tolist()
        positions = torch.rand(n, generator=generator, dtype=torch.float64).cumsum(0) + 1e-3 * torch.arange(n)
        assert find_peaks(curve, positions) == [], trial
        assert find_peaks(curve, positions, smoothing=None, standard_errors=[0.0] * n) == [], trial


def test_no_peak_on_noisy_monotone_test_risk_curves():
    """A test risk falling as 0.2 + p^(-1/2) over WIDTHS with multiplicative noise (2% and 5%, the points far
    apart in p are independent), 300 seeds each: no peak with the defaults, nor with the true standard
    errors."""
    widths = torch.tensor(WIDTHS, dtype=torch.float64)
    clean = 0.2 + widths**-0.5
    generator = torch.Generator().manual_seed(1)
    for relative in (0.02, 0.05):
        for seed in range(300):
            curve = clean * (
                1 + relative * torch.randn(len(WIDTHS), generator=generator, dtype=torch.float64)
            )
            assert find_peaks(curve, WIDTHS) == [], (relative, seed)
            assert find_peaks(curve, WIDTHS, standard_errors=relative * clean) == [], (relative, seed)


def test_no_peak_on_a_noisy_plateau():
    """An epoch-wise curve descending into a long flat plateau with noise of a hundredth of its descent: no
    peak in 300 seeds, with the estimate or the true standard errors."""
    x = torch.linspace(0, 1, 61, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    for seed in range(300):
        curve = (
            0.1 + 0.8 * torch.exp(-10 * x) + 0.01 * torch.randn(61, generator=generator, dtype=torch.float64)
        )
        assert find_peaks(curve, x) == [], seed
        assert find_peaks(curve, x, standard_errors=[0.01] * 61) == [], seed


@pytest.mark.parametrize("kind", ["pure noise", "noisy stairs"])
def test_false_peak_rate_is_the_documented_one(kind):
    """Noise alone makes a peak now and then: on 500 seeded curves of 31 points (pure Gaussian noise, or a
    staircase of three noisy plateaus, steps of ten standard deviations), at most 3% of them; measured on
    2000 draws: 1.5% and 1.5% (the module docstring's "about 1%" is for pure noise)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.linspace(0, 1, 31, dtype=torch.float64)
    hits = 0
    for _ in range(500):
        noise = torch.randn(31, generator=generator, dtype=torch.float64)
        curve = noise if kind == "pure noise" else 1.0 - 0.3 * torch.floor(3 * x).clamp(max=2) + 0.03 * noise
        hits += bool(find_peaks(curve, x))
    assert hits <= 15
