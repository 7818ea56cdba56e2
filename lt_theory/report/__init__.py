r"""The report: every measurement of the lt_theory callbacks turned into a verdict, its reference, and advice.

lt_theory's method has three steps: a theoretical condition, a fast measurement of it, and a look at whether a
run has it, with advice when it does not. The callbacks do the first two; this package does the third. It reads
what a run logged (its TensorBoard event files, so it works after the fact, on a folder of runs and on a
sweep), applies one rule per condition (:data:`~lt_theory.report.rules.RULES`: the tags read, the reference and
where it comes from, the thresholds, the advice) and returns a :class:`Report` of :class:`Finding`\ s with a
verdict each: ``"holds"``, ``"borderline"``, ``"violated"``, or ``"unknown"`` where no defensible reference
exists (the number is shown, never a guess).

The conditions and their references:

- the training itself: a finite loss, a loss that falls, a loss below chance ln C (Karpathy 2019);
- the Polyak-Lojasiewicz condition: ||grad L||^2 >= 2 mu (L - L*) guarantees
  L_t - L* <= exp(-t lr mu (2 - lr beta)) (L_0 - L*) (Polyak 1963; Karimi, Nutini & Schmidt 2016); it must
  promise at least one e-fold over the steps measured unless the loss already fell that much;
- smoothness against the learning rate: lr x sharpness < 2 (GD on a quadratic diverges beyond; Cohen et al.
  2021's edge of stability is at 2, 2 + 2m with momentum m);
- the scale of the inputs the first layer sees, within a decade of unit scale (LeCun et al. 1998; the limits
  measured, see :mod:`lt_theory.report.rules`); activation conditioning (LeCun et al. 1998) against float32's
  resolution, and whether BatchNorm lowers it (Ioffe & Szegedy 2015; Santurkar et al. 2018); gradient health,
  gradient-to-weight ratios (Glorot & Bengio 2010);
- spectral: the growth of the certified Lipschitz bound and the normalised margins (Bartlett, Foster &
  Telgarsky 2017);
- lazy vs feature learning: the NTK's relative change (Lee et al. 2019; Chizat, Oyallon & Bach 2019);
- stability to SGD noise: an error barrier under 2% (Frankle, Dziugaite, Roy & Carbin 2020);
- lottery tickets: a pruned level within one point of the dense accuracy that beats the random controls
  (Frankle & Carbin 2019);
- double descent: a test error that rises past interpolation and stays up sits at the peak (Nakkiran et al.
  2019); for a sweep, wider must help (Belkin et al. 2019).

Advice is ordered as practitioners debug: a bug first (pipeline, labels, initialisation), then the data
(normalisation), then the algorithm (learning rate, warm-up, width, normalisation layers, weight decay); a
run's violated bug or data finding puts its first advice ahead of its later findings' advice. One exception: a
training-loss symptom (a non-finite loss, a loss that does not fall, a loss at chance) that a violated measured
cause explains (inputs far from unit scale; lr x sharpness past the stability limit) is led by that cause's
advice, and so is the report (:attr:`Report.leads`): the bug hunt comes next.

Outputs: :meth:`Report.to_markdown` (the verdict table), :meth:`Report.write` (``report.md``, a self-contained
``report.html`` with the callbacks' figures embedded, and the TensorBoard text ``report/diagnosis`` of each
run), ``python -m lt_theory.report LOGDIR`` (prints the table and writes the files; ``--no-write``), and the
:class:`TheoryReport` callback, which does it all when a fit ends.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> from lt_theory.report import diagnose
    >>> folder = tempfile.mkdtemp()
    >>> with SummaryWriter(folder) as writer:
    ...     writer.add_scalar("landscape/sharpness", 400.0, global_step=100)
    ...     writer.add_scalar("landscape/sharpness_x_lr", 40.0, global_step=100)
    >>> report = diagnose(folder)
    >>> finding = report.finding("Smoothness vs learning rate")
    >>> finding.verdict, finding.value, finding.reference
    ('violated', 40.0, '< 2 (gradient descent; no hparams.yaml: assumed without momentum)')
    >>> print(finding.advice[0])
    Algorithm: Lower the learning rate to at most 0.005 (= 2 / sharpness 400 at step 100): the step is too
    large for the curvature.
"""

from lt_theory.report.callback import TheoryReport
from lt_theory.report.diagnosis import VERDICTS, Finding, Report, diagnose
from lt_theory.report.read import RunLog, read_runs
from lt_theory.report.rules import RULES, Rule

__all__ = [
    "RULES",
    "VERDICTS",
    "Finding",
    "Report",
    "Rule",
    "RunLog",
    "TheoryReport",
    "diagnose",
    "read_runs",
]
