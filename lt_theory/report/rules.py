"""The rules of the report, as data: one per condition, with its reference, where it comes from, and advice.

Each :class:`Rule` names the condition, the tags it reads, its reference (a template filled with the numbers of
the run), the source of that reference (a paper's number, or a bound derived from one, or a choice of
lt_theory's, said as such), the stage of the training recipe it points at, the thresholds its check uses
(``limits``) and its advice. The check that turns a run's numbers into a verdict is in
:mod:`lt_theory.report.checks`, registered under the rule's ``key``.

Advice items are ``(stage, template)`` pairs. The stages are the order in which practitioners debug
(Karpathy 2019, "A Recipe for Training Neural Networks"): ``"bug"`` (pipeline, labels, initialisation),
``"data"`` (normalisation), ``"algorithm"`` (learning rate, warm-up, width, normalisation layers, weight
decay). A finding's advice is sorted by stage (stable within a stage); a template naming a number the check
did not produce (e.g. ``{first_layer}`` when the worst layer is not the first) is left out.

**Measured causes come before the bug hunt.** The training-loss rules (``symptom=True``: a non-finite loss, a loss
that does not fall, a loss at chance) see what went wrong, not why, so their advice is a bug hunt. Two rules
measure a cause that produces those symptoms on its own (``cause=True``): inputs far from unit scale
(``input_scale``, data) and a step past the stability limit (``smoothness``, algorithm: lr x sharpness measured
above 2, or 2 + 2m with momentum m, while it was still finite). When a symptom and a cause are both violated in a
run, the symptom is explained: the first advice of the earliest-stage violated cause leads the symptom's advice
and the whole report's (:meth:`~lt_theory.report.Report.advice`), the symptom keeps only its bug-stage items
(tried if the fix does not remove it), and it pushes no bug hunt ahead of the other findings. A run whose loss
went to NaN at lr x sharpness = 20 is told "lower the learning rate to 2 / sharpness" first, then "look for a bug"
if the loss is still not finite at that rate: the measured cause is the cheapest thing to test (one re-run at the
computed rate), and a bug hunt first would send the user looking for a NaN in the data that is not there
(tests/test_report_runs.py: an MLP at lr = 20 / its sharpness at initialisation has a NaN loss from step 18 to 20,
seeds 0 to 4, and its report starts with "lower the learning rate to 2 / sharpness"; the same MLP on inputs x1000
at lr 0.05 blows up in its first epoch, and its report starts with normalising the inputs). A non-finite loss with
no violated cause (lr x sharpness under the limit at every finite measurement, or never finite) is still a bug
hunt first. A run at chance with no violated cause (shuffled labels, or a network too narrow for its data: one run
cannot tell the two apart, a wider twin of the same pipeline can) is told to check the labels, then to overfit one
small batch, then to go wider: Karpathy's order.

The rules that cannot see the inputs (a non-finite loss, a PL plateau, exploding gradients) give the generic
:data:`NORMALISE` item; a run whose first layer's input RMS was measured (the ``input_scale`` rule judged it)
does without it: the input-scale finding says whether normalising applies, with the number, and a report does
not say "normalise" next to "Input scale: holds".

Thresholds (the ``limits`` of each rule):

==========================  ===================================================================================
``EDGE_OF_STABILITY`` = 2   lr x sharpness above which gradient descent on a quadratic diverges (2 + 2m with
                            heavy-ball momentum m, (2 + 2m) / (1 + 2m) with Nesterov's; Cohen et al. 2021)
``STABILITY_BAND`` = 0.1    +-10% around that limit is "borderline", the edge of stability (lt_theory's band)
``BARRIER_LIMIT`` = 0.02    the error barrier of a stable network (Frankle et al. 2020)
``MATCH_TOLERANCE`` = 0.01  a ticket "matches" within one percentage point of the dense accuracy, and beats a
                            control by more than that (about one standard deviation of ResNet-20 on CIFAR-10
                            reruns in Frankle et al. 2020)
``LAZY_THRESHOLD`` = 0.1    NTK relative change below which a run is lazy (NTKDrift's default; the run's own
                            threshold is read from ``ntk/verdict`` when it differs)
``FLOAT32_CONDITION``       1 / eps(float32) = 8.4e6: the covariance of float32 activations with a larger
                            condition number is numerically singular (a decade below it is "borderline")
``RANK_DEFICIENT`` = 1e11   condition numbers this large are the measure's floor (LossLandscapeMonitor's
                            ``condition_floor`` 1e-12): a rank-deficient covariance, which fewer probe examples
                            than features (a Linear layer's input) also gives; not judged
``VANISHING_RATIO`` = 1e-5  gradient-to-weight norm ratio under which a layer barely moves (a relative update
                            of at most 1e-5 per step for any lr <= 1; CS231n's healthy update ratio is ~1e-3)
``EXPLODING_UPDATE`` = 1    lr x gradient-to-weight ratio above which one step rewrites the layer
``CHANCE_FRACTION`` = 0.95  a training loss at or above 95% of ln C is at chance (5% margin for batch noise)
``INPUT_SCALE`` = 0.1, 10   the first layer's input RMS (``landscape/input_rms/<first layer>``) beyond a
                            decade of 1 is "violated", beyond half a decade (1 / sqrt(10) to sqrt(10))
                            "borderline". Measured by tests/test_report_runs.py
                            (``test_input_scale_limits_where_learning_rates_stop_working``: an MLP 32-64-10 on
                            standardised Gaussian clusters times s, plain SGD, 3 epochs of 640 in batches of 32,
                            the full training loss after; chance 0.95 ln 10 = 2.19): the sharpness at
                            initialisation is 0.70 at s = 1, x7.1 at s = 3, x80 at s = 10 and x0.25 at s = 0.1
                            (the last layer's alone); a scale acts on the first layer as a learning-rate factor
                            of about s^2, so one rate trains about a decade of scales. Loss at s = 0.1, 0.32, 1,
                            3.2, 10: lr 0.05: 2.28 (chance), 2.12, 1.02, 0.12, 0.014; lr 0.1: 2.25 (chance),
                            1.90, 0.34, 0.048, 0.003; lr 0.5: 1.84, 0.17, 0.028, 0.003, NaN. A decade from 1, a
                            rate that trains the standardised data fails (NaN, or stuck at chance); within half
                            a decade all three train. A normalisation layer right after the first layer absorbs
                            a large scale (ResNet-8 on synthetic CIFAR x1000: the same loss and sharpness at
                            initialisation as x1, tests/test_report_runs.py): then it holds
``PL_EFOLDS`` = 1           PL at lr = 1/beta must guarantee at least one e-fold of loss decrease over the
                            steps measured: kappa = beta / mu at most that number of steps
``DD_TOLERANCE`` = 0.01     a test-error rise counts when above 1 point (two binomial standard errors on a
                            10,000-example test set at 30% error)
==========================  ===================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["NORMALISE", "RULES", "STAGES", "STAGE_LABELS", "Rule", "rule"]

STAGES = ("bug", "data", "algorithm")
STAGE_LABELS = {"bug": "Debug", "data": "Data", "algorithm": "Algorithm"}

EDGE_OF_STABILITY = 2.0
STABILITY_BAND = 0.1
BARRIER_LIMIT = 0.02
MATCH_TOLERANCE = 0.01
LAZY_THRESHOLD = 0.1
FLOAT32_CONDITION = float(1 / np.finfo(np.float32).eps)
RANK_DEFICIENT = 1e11
VANISHING_RATIO = 1e-5
EXPLODING_UPDATE = 1.0
CHANCE_FRACTION = 0.95
INPUT_SCALE = (0.1, 10.0)
PL_EFOLDS = 1.0
DD_TOLERANCE = 0.01

KARPATHY = "Karpathy 2019, 'A Recipe for Training Neural Networks'"
NAKKIRAN = "Nakkiran et al. 2019, 'Deep Double Descent'"
FRANKLE_LMC = (
    "Frankle, Dziugaite, Roy & Carbin 2020, 'Linear Mode Connectivity and the Lottery Ticket Hypothesis'"
)



def _bug(template: str) -> tuple[str, str]:
    """An advice item of the ``"bug"`` stage (pipeline, labels, initialisation)."""
    return ("bug", template)


def _data(template: str) -> tuple[str, str]:
    """An advice item of the ``"data"`` stage (normalisation)."""
    return ("data", template)


def _algorithm(template: str) -> tuple[str, str]:
    """An advice item of the ``"algorithm"`` stage (learning rate, warm-up, width, normalisation layers, ...)."""
    return ("algorithm", template)


NORMALISE = _data(
    "Normalise the inputs: subtract the training set's per-channel mean and divide by its "
    "standard deviation, so the first layers see values of order one."
)
_OVERFIT_ONE_BATCH = _bug(
    "Overfit one small batch (a handful of examples): a correct pipeline drives its loss to about 0 in a few "
    "hundred steps, even with a small network. If it cannot, look for a bug: the optimizer not stepping, "
    "zero_grad missing, frozen parameters, a loss detached from the graph, a learning rate of 0."
)


@dataclass(frozen=True)
class Rule:
    """One condition of the report: what it reads, its reference and source, and what to try.

    Attributes:
        key: the name its check is registered under in :data:`lt_theory.report.checks.CHECKS`.
        condition: the condition, as the report names it.
        quantity: the tags read.
        reference: the reference, a template filled with the limits and the numbers of the run.
        source: where the reference comes from.
        stage: the stage of the recipe a violation points at (one of :data:`STAGES`); a violated earlier
            stage puts its first advice ahead of later stages' in the same run.
        limits: the thresholds the check uses.
        advice: ``(stage, template)`` items for a violated (and, without ``borderline_advice``, borderline)
            verdict.
        borderline_advice: items for a borderline verdict, when they differ.
        cause: the rule measures a cause of the training-loss symptoms (see "Measured causes" above): when it is
            violated, it explains a violated symptom of the same run and its first advice leads.
        symptom: the rule sees a training-loss symptom that a violated cause of the same run explains.
    """

    key: str
    condition: str
    quantity: str
    reference: str
    source: str
    stage: str
    limits: Mapping[str, float] = field(default_factory=dict)
    advice: tuple[tuple[str, str], ...] = ()
    borderline_advice: tuple[tuple[str, str], ...] | None = None
    cause: bool = False
    symptom: bool = False


RULES: tuple[Rule, ...] = (
    Rule(
        key="finite_loss",
        condition="Finite loss",
        quantity="train/loss_step, train/loss_epoch, val/loss, landscape/loss",
        reference="finite at every step",
        source=f"a non-finite loss is a diverged run (lt_theory's evaluation rule); rule out a bug first: {KARPATHY}",
        stage="bug",
        symptom=True,
        advice=(
            _bug(
                "Look for a bug: NaN or Inf in the inputs or labels, a log or a division by zero in the loss "
                "(give cross_entropy logits, not probabilities), a layer dividing by a zero statistic."
            ),
            NORMALISE,
            _algorithm("Then lower the learning rate (e.g. x0.1), add warm-up, or clip the gradient norm."),
        ),
    ),
    Rule(
        key="loss_decreases",
        condition="Training loss decreases",
        quantity="train/loss_epoch (else train/loss_step)",
        reference="last < first",
        source=f"a network that does not lower its training loss has a bug until shown otherwise: {KARPATHY}",
        stage="bug",
        symptom=True,
        advice=(
            _OVERFIT_ONE_BATCH,
            _algorithm("If one batch can be fitted, raise the learning rate or train longer."),
        ),
    ),
    Rule(
        key="above_chance",
        condition="Training loss below chance",
        quantity="train/loss_epoch (else train/loss_step), num_classes",
        reference="< {chance_fraction:g} x ln C = {chance_limit:.4g} (C = {num_classes})",
        source=f"a uniform guess over C classes has cross-entropy ln C (check it at initialisation: {KARPATHY}); "
        "5% margin for batch noise (lt_theory)",
        stage="bug",
        symptom=True,
        limits={"chance_fraction": CHANCE_FRACTION},
        advice=(
            _bug(
                "Check the labels and the pipeline: labels aligned with their inputs (not shuffled separately), "
                "inputs and labels from the same split, targets as class indices, the model fed the images "
                "(not a constant); plot a batch with its labels."
            ),
            _OVERFIT_ONE_BATCH,
            _algorithm(
                "If one small batch can be overfitted but the training set cannot, the network is too small "
                "for the data (one run cannot tell this from a bug; a wider copy of the same pipeline that "
                "fits can): make it wider, or raise the learning rate."
            ),
        ),
    ),
    Rule(
        key="pl",
        condition="PL condition",
        quantity="landscape/pl_ratio, landscape/condition (else landscape/sharpness), landscape/loss",
        reference="steps / kappa >= {efolds:g} (one e-fold guaranteed over the steps measured), or the loss "
        "already down e-fold",
        source="Polyak 1963; Karimi, Nutini & Schmidt 2016 (Thm 1): with ||grad L||^2 >= 2 mu (L - L*) and "
        "lr = 1/beta, L_t - L* <= (1 - 1/kappa)^t (L_0 - L*), kappa = beta / mu",
        stage="algorithm",
        limits={"efolds": PL_EFOLDS},
        advice=(
            _bug(
                "A high loss with a vanishing gradient is a plateau: check the initialisation (He/Kaiming for "
                "ReLU, no layer at zero blocking the gradient) and look for dead ReLUs."
            ),
            NORMALISE,
            _algorithm(
                "Add normalisation layers or residual connections, or widen the network (wide networks "
                "satisfy PL along their path: Liu, Zhu & Belkin 2022); use warm-up rather than a smaller "
                "learning rate."
            ),
        ),
    ),
    Rule(
        key="smoothness",
        condition="Smoothness vs learning rate",
        quantity="landscape/sharpness_x_lr",
        reference="< {limit:.3g} ({limit_note})",
        source="gradient descent on a quadratic diverges when lr x beta > 2; full-batch GD hovers at lr x beta ~ 2, "
        "the edge of stability (Cohen, Kaur, Li, Kolter & Talwalkar 2021; 2 + 2m with momentum m); "
        "+-10% band around the limit: lt_theory",
        stage="algorithm",
        cause=True,
        limits={"limit": EDGE_OF_STABILITY, "band": STABILITY_BAND},
        advice=(
            _algorithm("Lower the learning rate{lr_to}: the step is too large for the curvature."),
            _algorithm(
                "Add learning-rate warm-up (Goyal et al. 2017; Gilmer et al. 2022): the sharpness falls "
                "early in training, so a rate too large at the start can be fine later."
            ),
            _algorithm(
                "Normalisation layers (BatchNorm, LayerNorm) lower the sharpness reached at a given "
                "learning rate (Santurkar et al. 2018)."
            ),
        ),
    ),
    Rule(
        key="input_scale",
        condition="Input scale",
        quantity="landscape/input_rms/<first layer>",
        reference="{low:g} <= RMS <= {high:g} (within a decade of 1, the RMS of standardised inputs)",
        source="LeCun, Bottou, Orr & Mueller 1998, 'Efficient BackProp' (inputs of zero mean and unit variance) "
        "and the initialisations that assume them (Glorot & Bengio 2010; He et al. 2015): an input scale s "
        "multiplies the first layer's curvature by about s^2 (condition numbers cannot see it); limits: "
        "lt_theory's, measured (see the table above)",
        stage="data",
        cause=True,
        limits={"low": INPUT_SCALE[0], "high": INPUT_SCALE[1], "band": float(np.sqrt(10.0))},
        advice=(
            _data(
                "Normalise the inputs: {first_layer}, the first layer, sees values of RMS {rms:.3g}, {how} "
                "the 1 of standardised data. Subtract the training set's per-channel mean and divide by its "
                "standard deviation (a forgotten / 255, or a transform that is not applied, is the usual "
                "cause)."
            ),
            _algorithm(
                "If the inputs cannot be normalised, put a normalisation layer right after {first_layer} "
                "(BatchNorm absorbs the scale of its input), or retune the learning rate: the scale multiplies "
                "the first layer's curvature by about {curvature_factor:.2g}."
            ),
        ),
    ),
    Rule(
        key="activation_conditioning",
        condition="Activation conditioning",
        quantity="landscape/input_condition/<layer> (layers without normalisation)",
        reference="< {limit:.3g} (1 / float32 epsilon)",
        source="LeCun, Bottou, Orr & Mueller 1998, 'Efficient BackProp': gradient descent on a layer converges at "
        "the condition number of its input covariance (centre, decorrelate, scale the inputs); beyond "
        "1 / eps(float32) the covariance is numerically singular",
        stage="data",
        limits={"limit": FLOAT32_CONDITION, "band": 0.1, "rank_deficient": RANK_DEFICIENT},
        advice=(
            _data(
                "Normalise the inputs ({first_layer} is the first layer measured): subtract the per-channel "
                "mean and divide by the standard deviation of the training set; whitening goes further."
            ),
            _bug(
                "Near-zero-variance directions at {hidden_layer} usually mean dead units (ReLUs that never fire) "
                "or constant channels: check the initialisation and the layer before it."
            ),
            _algorithm("Add BatchNorm (or LayerNorm) before {worst_layer}{norm_note}."),
        ),
    ),
    Rule(
        key="batchnorm",
        condition="BatchNorm lowers conditioning",
        quantity="landscape/output_condition/<norm layer> / landscape/input_condition/<norm layer>",
        reference="geometric mean over the normalisation layers <= {limit:g}",
        source="Ioffe & Szegedy 2015; Santurkar, Tsipras, Ilyas & Madry 2018: BatchNorm improves the conditioning "
        "of training (here measured on the activations)",
        stage="algorithm",
        limits={"limit": 1.0},
        advice=(
            _algorithm(
                "BatchNorm at {worst_layer} raises the activation condition number: per-channel scaling "
                "does not remove correlations between channels. Check its placement (before the "
                "non-linearity) or try whitening or GroupNorm."
            ),
        ),
    ),
    Rule(
        key="gradient_health",
        condition="Gradient health",
        quantity="landscape/grad_to_weight/<layer>, lr",
        reference="grad/weight > {vanishing:g} and lr x grad/weight < {exploding:g}",
        source="Glorot & Bengio 2010 (vanishing and exploding gradients); a healthy update-to-weight ratio is about "
        "1e-3 (Karpathy, CS231n notes): below 1e-5 a layer barely moves, above 1 one step rewrites it",
        stage="algorithm",
        # borderline: within a factor `band` of the vanishing limit, or `exploding_band` of the exploding one (a
        # healthy ResNet-20 at He et al.'s lr 0.1, the quick start, peaks at 0.15 at net.fc when training starts)
        limits={"vanishing": VANISHING_RATIO, "exploding": EXPLODING_UPDATE, "band": 10.0, "exploding_band": 2.0},
        advice=(
            _bug(
                "Check that {vanishing_layer} is trained: requires_grad set, no .detach() or torch.no_grad() in "
                "forward, a sensible initialisation (He/Kaiming for ReLU, not zeros)."
            ),
            _bug(
                "An exploding gradient at {exploding_layer}: look for unnormalised targets or inputs and a loss "
                "that can reach huge values."
            ),
            NORMALISE,
            _algorithm(
                "Vanishing at {vanishing_layer}: add normalisation layers or residual connections, or "
                "raise the learning rate with warm-up."
            ),
            _algorithm(
                "Exploding at {exploding_layer}: lower the learning rate or clip the gradient norm "
                "(Pascanu, Mikolov & Bengio 2013)."
            ),
        ),
    ),
    Rule(
        key="lipschitz_growth",
        condition="Lipschitz bound growth",
        quantity="spectral/lipschitz_upper (last / first)",
        reference="finite; no universal growth limit (compare with a healthy run of the same model)",
        source="Bartlett, Foster & Telgarsky 2017: the margin bound grows with the spectral complexity, and fitting "
        "random labels grows it far more than true labels; no threshold is given",
        stage="algorithm",
        advice=(
            _algorithm(
                "The layer norms are not finite (the weights diverged): lower the learning rate, add "
                "weight decay or clip the gradient norm."
            ),
        ),
    ),
    Rule(
        key="margins",
        condition="Normalised margins",
        quantity="spectral/margin_normalized/p10, spectral/margin_normalized/p50",
        reference="p10 > 0 (at least 90% of the probe classified with a positive margin)",
        source="Bartlett, Foster & Telgarsky 2017: margins normalised by R_A ||X||_F / n; a negative margin is a "
        "misclassified example",
        stage="algorithm",
        advice=(
            _bug("Most of the probe is misclassified: check the labels and the pipeline first."),
            _algorithm(
                "If the pipeline is right, the network does not fit its training probe: train longer or "
                "wider."
            ),
        ),
        borderline_advice=(
            _algorithm(
                "The lowest-margin tenth of the probe is misclassified: with label noise these are the "
                "noisy labels (see dd/memorized_fraction); otherwise train longer or wider."
            ),
        ),
    ),
    Rule(
        key="ntk",
        condition="Feature learning (NTK drift)",
        quantity="ntk/relative_change",
        reference=">= {threshold:g} (feature learning; below: lazy)",
        source="Lee et al. 2019: the NTK of wide networks barely moves; Chizat, Oyallon & Bach 2019: lazily trained "
        "deep CNNs generalise worse; threshold: NTKDrift's lazy_threshold",
        stage="algorithm",
        limits={"threshold": LAZY_THRESHOLD},
        advice=(_bug("The tangent kernel is not finite: NaN or Inf in the weights (see 'Finite loss')."),),
        borderline_advice=(
            _algorithm(
                "The network trains lazily, near its linearisation. To learn features, raise the learning "
                "rate, lower the output scale or the width multiplier (Chizat et al. 2019; maximal-update "
                "parametrisation, Yang & Hu 2021) or train longer; for a very wide network lazy training "
                "is the expected regime."
            ),
        ),
    ),
    Rule(
        key="lmc_stability",
        condition="Stability to SGD noise (LMC)",
        quantity="lmc/test_error_barrier (else lmc/train_error_barrier) against spawn step k",
        reference="< {barrier:g} at some k",
        source=f"{FRANKLE_LMC}: stable when the error barrier is under 2%; ResNet-20 on CIFAR-10 is stable from "
        "about 3% of training",
        stage="algorithm",
        limits={"barrier": BARRIER_LIMIT},
        advice=(
            _algorithm(
                "Lower the learning rate or add warm-up: Frankle et al. found deep networks unstable at "
                "initialisation at standard learning rates, and stable early with warm-up."
            ),
            _algorithm(
                "Spawn (or rewind IMP) later than step {last_k}: stability arrives early in training "
                "(about 3% of it for ResNet-20)."
            ),
            _algorithm("A larger batch lowers the SGD noise that separates the siblings."),
        ),
    ),
    Rule(
        key="lmc_init",
        condition="Path from initialisation",
        quantity="lmc/init_test_error_barrier (else lmc/init_train_error_barrier)",
        reference="none (Goodfellow et al. saw monotone paths, without a threshold)",
        source="Goodfellow, Vinyals & Saxe 2015, 'Qualitatively characterizing neural network optimization "
        "problems'",
        stage="algorithm",
        advice=(
            _bug("The path's error is not finite: the current weights diverged (see 'Finite loss')."),
        ),
    ),
    Rule(
        key="imp_matching",
        condition="Matching ticket (IMP)",
        quantity="imp/accuracy_by_remaining_bp (else imp/accuracy, imp/remaining_fraction), imp/diverged_level",
        reference="accuracy >= dense - {tolerance:g} at some pruned level",
        source="Frankle & Carbin 2019; Frankle et al. 2020: a matching subnetwork reaches the dense accuracy "
        "(within about one standard deviation, ~1 point for ResNet-20 on CIFAR-10)",
        stage="algorithm",
        limits={"tolerance": MATCH_TOLERANCE},
        advice=(
            _algorithm("Level {diverged_level} diverged: lower the learning rate or the pruning fraction."),
            _algorithm(
                "Rewind to a later step k: IMP finds matching tickets in deep networks only when rewound "
                "to a point where training is stable (Frankle et al. 2020: k = 2000 for ResNet-20; see "
                "'Stability to SGD noise')."
            ),
            _algorithm("Prune less per level (fraction 0.2, as in the papers), or stop at a denser level."),
        ),
    ),
    Rule(
        key="imp_controls",
        condition="Ticket beats random controls",
        quantity="imp/accuracy_by_remaining_bp of the IMP run and of its random_reinit / random_prune runs",
        reference="IMP accuracy > control + {tolerance:g} at the sparsest level both reached",
        source="Frankle & Carbin 2019: winning tickets beat random re-initialisation and random pruning at the "
        "same sparsity",
        stage="algorithm",
        limits={"tolerance": MATCH_TOLERANCE},
        advice=(
            _algorithm(
                "The controls do as well as IMP: at this sparsity the mask and the rewound weights carry "
                "nothing special. Rewind later (k > 0) or prune further before judging (Frankle et al. "
                "2020)."
            ),
        ),
    ),
    Rule(
        key="dd_epochwise",
        condition="Double descent (epoch-wise)",
        quantity="dd/test_error, dd/train_error, dd/interpolation_epoch",
        reference="final test error <= best before interpolation + {tolerance:g}",
        source=f"{NAKKIRAN}: the test error peaks near the interpolation threshold and descends again; tolerance "
        "of 1 point, two binomial standard errors on 10,000 test examples (lt_theory)",
        stage="algorithm",
        limits={"tolerance": DD_TOLERANCE},
        advice=(
            _algorithm(
                "The run sits at the double-descent peak (Nakkiran et al. 2019): go wider, past the "
                "interpolation threshold, or regularise (weight decay, data augmentation) to lower the "
                "peak."
            ),
            _algorithm("Or train longer: the epoch-wise second descent comes after the peak."),
            _algorithm(
                "Or stop early: the best test error before interpolation was {best:.4g} at step {best_step}."
            ),
        ),
        borderline_advice=(
            _algorithm(
                "The second descent is under way but the test error is still above its best before "
                "interpolation ({best:.4g}): train longer, or go wider."
            ),
        ),
    ),
    Rule(
        key="overparameterisation",
        condition="Over-parameterisation: wider helps",
        quantity="dd/test_error_by_width (the sweep's aggregate run)",
        reference="test error at the widest <= lowest + {tolerance:.3g} (two standard errors)",
        source="Belkin, Hsu, Ma & Mandal 2019; Nakkiran et al. 2019: past the interpolation threshold wider models "
        "generalise better; tolerance 2 sqrt(e(1-e)/N) as lt_theory.sweep computes it",
        stage="algorithm",
        limits={"tolerance": 0.01},
        advice=(
            _algorithm(
                "Wider does not help on this grid{why}: extend it to wider models, past the peak "
                "(Nakkiran et al. 2019)."
            ),
            _algorithm(
                "Regularise (weight decay, data augmentation) or stop early: well-tuned regularisation "
                "removes the peak (Nakkiran, Venkat, Kakade & Ma 2021)."
            ),
            _algorithm(
                "Train longer: models trained too briefly are not yet past their own epoch-wise peak."
            ),
        ),
    ),
)


def rule(key: str) -> Rule:
    """The rule registered under ``key``.

    Args:
        key: a rule's key, e.g. ``"smoothness"``.

    Returns:
        The :class:`Rule`.

    Raises:
        KeyError: for an unknown key, listing the known ones.

    Example:
        >>> rule("lmc_stability").limits["barrier"]
        0.02
    """
    for candidate in RULES:
        if candidate.key == key:
            return candidate
    raise KeyError(f"no rule {key!r}; the rules are {[r.key for r in RULES]}")
