"""The checks behind the rules: each reads one run's numbers and returns a verdict with its evidence.

A check takes the run (:class:`~lt_theory.report.read.RunLog`), its rule's ``limits`` and the
:class:`Context` (every run of the diagnosis, the number of classes) and returns a :class:`Judgement`, or None
when the run did not log what the rule reads. The numbers a judgement puts in ``facts`` fill the rule's
reference and advice templates. The training-loss, landscape and conditioning checks are here; the
callbacks' own conditions (spectral, NTK, LMC, IMP, double descent, the sweep) in
:mod:`lt_theory.report.theory_checks`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from lt_theory.report.read import RunLog

__all__ = ["CHECKS", "Context", "Judgement", "is_normalisation_layer"]

NORMALISATION_LAYER = re.compile(r"(^|[._])(bn\d*|\w*norm\w*)($|[._])", re.IGNORECASE)
"""Layer names taken for normalisation layers (``bn1``, ``norm``, ``batchnorm``, ``layer_norm`` ...)."""


class Judgement(NamedTuple):
    """A check's answer: the verdict, the number judged, a sentence of evidence, the tag, template values."""

    verdict: str
    value: float
    evidence: str
    quantity: str
    facts: dict


@dataclass
class Context:
    """What a check may need beyond its run: every run of the diagnosis and the number of classes."""

    runs: list[RunLog] = field(default_factory=list)
    num_classes: int | None = None
    cache: dict = field(default_factory=dict)

    def classes(self, run: RunLog) -> int | None:
        """The number of classes: given, else ``num_classes`` from the run's ``hparams.yaml``."""
        value = self.num_classes if self.num_classes is not None else run.hparams.get("num_classes")
        return int(value) if isinstance(value, (int, float)) and value >= 2 else None


Check = Callable[[RunLog, Mapping, Context], "Judgement | None"]
CHECKS: dict[str, Check] = {}


def check(key: str):
    """Register a check under its rule's key."""

    def register(function: Check) -> Check:
        CHECKS[key] = function
        return function

    return register


def fmt(value: float | None) -> str:
    """A number for a sentence: 4 significant digits (None as ``n/a``)."""
    return "n/a" if value is None else f"{value:.4g}"


def is_normalisation_layer(name: str) -> bool:
    """Whether a layer's name says it is a normalisation layer (``net.bn1``, ``norm``, ``ln_f``...).

    Example:
        >>> is_normalisation_layer("net.layer1.0.bn1"), is_normalisation_layer("net.layer1.0.conv1")
        (True, False)
    """
    return bool(NORMALISATION_LAYER.search(name)) or name.split(".")[-1].startswith("ln")


def _finite(series) -> list[tuple[int, float]]:
    return [(s, v) for s, v in series if math.isfinite(v)]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _largest_update(run: RunLog, layers) -> tuple[float, str] | None:
    """The largest ``lr_t x grad/weight_t`` over the landscape monitor's measurements and layers, with the
    layer; ``lr_t = sharpness_x_lr / sharpness`` at the same step. None without those series."""
    rates = {
        step: product / sharpness
        for (step, product), (_, sharpness) in zip(
            run.scalars.get("landscape/sharpness_x_lr", []), run.scalars.get("landscape/sharpness", [])
        )
        if math.isfinite(product) and math.isfinite(sharpness) and sharpness != 0
    }
    updates = [
        (rates[step] * ratio, name)
        for name in layers
        for step, ratio in run.scalars.get(f"landscape/grad_to_weight/{name}", [])
        if step in rates and math.isfinite(ratio)
    ]
    return max(updates, default=None)


def _learning_rate(run: RunLog) -> float | None:
    """The learning rate: the landscape monitor's (sharpness_x_lr / sharpness), else the ``lr`` tag, else the
    ``lr`` of hparams.yaml."""
    product = run.last("landscape/sharpness_x_lr", finite=True)
    sharpness = run.last("landscape/sharpness", finite=True)
    if product is not None and sharpness:
        return product / sharpness
    lr = run.last("lr", finite=True)
    if lr is None and isinstance(run.hparams.get("lr"), (int, float)):
        lr = float(run.hparams["lr"])
    return lr


# -- training loss ----------------------------------------------------------------------------------------


def _train_loss(run: RunLog) -> tuple[str, float, float, int] | None:
    """``(tag, first, last, points)`` of the training loss (epoch means, else the mean of a tenth of steps)."""
    tag = run.first_present("train/loss_epoch", "train/loss")
    if tag is None or len(_finite(run.scalars[tag])) < 2:
        tag = run.first_present("train/loss_step")
    if tag is None:
        return None
    values = [v for _, v in _finite(run.scalars[tag])]
    if len(values) < 2:
        return None
    k = 1 if tag != "train/loss_step" else max(1, len(values) // 10)
    return tag, _mean(values[:k]), _mean(values[-k:]), len(values)


@check("finite_loss")
def finite_loss(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    tags = [
        t
        for t in ("train/loss_step", "train/loss_epoch", "train/loss", "val/loss", "landscape/loss")
        if t in run.scalars
    ]
    if not tags:
        return None
    for tag in tags:
        bad = [(s, v) for s, v in run.scalars[tag] if not math.isfinite(v)]
        if bad:
            evidence = (
                f"`{tag}` is not finite at {len(bad)} of {len(run.scalars[tag])} logged steps, first at "
                f"step {bad[0][0]} ({bad[0][1]})."
            )
            return Judgement("violated", bad[0][1], evidence, tag, {"first_bad_step": bad[0][0]})
    return Judgement(
        "holds", run.last(tags[0]), f"{', '.join(f'`{t}`' for t in tags)} finite at every step.", tags[0], {}
    )


@check("loss_decreases")
def loss_decreases(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    found = _train_loss(run)
    if found is None:
        return None
    tag, first, last, points = found
    ratio = last / first if first > 0 else math.nan
    evidence = (
        f"`{tag}` went from {fmt(first)} to {fmt(last)} over {points} points (last / first {fmt(ratio)})."
    )
    verdict = "holds" if last < first else "violated"
    return Judgement(verdict, ratio, evidence, tag, {})


@check("above_chance")
def above_chance(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    found = _train_loss(run)
    classes = context.classes(run)
    if found is None:
        return None
    tag, _, last, _ = found
    if classes is None:
        evidence = (
            f"final `{tag}` {fmt(last)}; the number of classes is unknown (no num_classes in "
            "hparams.yaml; pass num_classes=), so chance level ln C cannot be placed."
        )
        return Judgement("unknown", last, evidence, tag, {})
    chance = math.log(classes)
    fraction = limits["chance_fraction"]
    facts = {"chance_limit": fraction * chance, "num_classes": classes}
    accuracy = run.last(
        run.first_present("train/acc_epoch", "train/acc", "train/acc_step") or "", finite=True
    )
    acc_text = "" if accuracy is None else f", train accuracy {fmt(accuracy)} (chance {fmt(1 / classes)})"
    evidence = f"final `{tag}` {fmt(last)} = {fmt(last / chance)} x ln {classes} ({fmt(chance)}){acc_text}."
    return Judgement(
        "violated" if last >= fraction * chance else "holds", last / chance, evidence, tag, facts
    )


# -- landscape --------------------------------------------------------------------------------------------


def _kappa(run: RunLog) -> float | None:
    """kappa = beta / mu: ``landscape/condition``, else sharpness / pl_ratio (None when neither is known)."""
    condition = run.last("landscape/condition")
    if condition is not None and not math.isnan(condition):
        return condition
    sharpness, mu = run.last("landscape/sharpness", finite=True), run.last("landscape/pl_ratio", finite=True)
    if sharpness is None or mu is None:
        return None
    return sharpness / mu if mu > 0 else math.inf


@check("pl")
def pl_condition(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    losses = _finite(run.scalars.get("landscape/loss", []))
    mu, kappa = run.last("landscape/pl_ratio", finite=True), _kappa(run)
    if len(losses) < 2 or mu is None:
        return None
    tag = "landscape/pl_ratio"
    last_loss = run.scalars["landscape/loss"][-1]
    if not math.isfinite(last_loss[1]):
        evidence = (
            f"the probe loss is not finite at step {last_loss[0]}: the run diverged, and the PL condition of a "
            "diverged network is not judged (see 'Finite loss')."
        )
        return Judgement("unknown", math.nan, evidence, tag, {})
    if kappa is None or kappa <= 0:
        evidence = (
            f"PL quotient {fmt(mu)}, but the sharpness is not known: kappa = beta / mu cannot be formed."
        )
        return Judgement("unknown", mu, evidence, tag, {})
    steps = losses[-1][0] - losses[0][0]
    loss_ratio = losses[-1][1] / losses[0][1] if losses[0][1] > 0 else math.nan
    efolds = steps / kappa  # at lr = 1/beta, PL removes a fraction 1/kappa of L - L* per step
    evidence = (
        f"PL quotient mu = {fmt(mu)} (running minimum {fmt(run.last('landscape/pl_ratio_min', finite=True))}), "
        f"kappa = beta / mu = {fmt(kappa)}: over the {steps} steps measured PL guarantees {fmt(efolds)} e-folds of "
        f"loss decrease at lr = 1/beta; the probe loss went from {fmt(losses[0][1])} to {fmt(losses[-1][1])} "
        f"(x{fmt(loss_ratio)})."
    )
    rates = (
        run.last("landscape/observed_rate", finite=True),
        run.last("landscape/predicted_rate", finite=True),
    )
    if None not in rates:
        evidence += f" Per step at the run's lr: observed rate {fmt(rates[0])}, predicted {fmt(rates[1])}."
    if efolds >= limits["efolds"] or loss_ratio <= math.exp(-1):
        return Judgement("holds", efolds, evidence, tag, {})
    evidence += " The gradient is too small for the loss that remains: a plateau."
    return Judgement("violated", efolds, evidence, tag, {})


def _stability_limit(run: RunLog, base: float) -> tuple[float | None, str]:
    """lr x beta limit for the run's optimizer (hparams), with a note; None for adaptive optimizers."""
    hp = run.hparams
    optimizer = str(hp.get("optimizer", "sgd")).lower()
    if optimizer not in ("sgd", "gd"):
        return None, f"{optimizer}: the raw lr x sharpness is not its stability quantity (Cohen et al. 2022)"
    momentum = float(hp.get("momentum", 0.0) or 0.0)
    if momentum <= 0:
        return base, "gradient descent" + ("" if hp else "; no hparams.yaml: assumed without momentum")
    if hp.get("nesterov"):
        limit = base * (1 + momentum) / (1 + 2 * momentum)
        return limit, f"Nesterov momentum {momentum:g}: (2 + 2m) / (1 + 2m)"
    return base * (1 + momentum), f"heavy-ball momentum {momentum:g}: 2 + 2m"


@check("smoothness")
def smoothness(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    tag = "landscape/sharpness_x_lr"
    if tag not in run.scalars:
        return None
    series = run.scalars[tag]
    limit, note = _stability_limit(run, limits["limit"])
    facts = {"limit": limits["limit"] if limit is None else limit, "limit_note": note, "lr_to": ""}
    finite = _finite(series)
    broken = [step for step, v in series if not math.isfinite(v)]
    diverged = f" Not finite from step {broken[0]}: the run diverged." if broken else ""
    if not finite:
        evidence = f"`{tag}` is not finite at any measurement (NaN or Inf from the start: see 'Finite loss')."
        return Judgement("unknown", series[-1][1], evidence, tag, facts)
    # judged at its largest finite value: a schedule's end (lr -> 0) or a diverged end (NaN) hides it
    peak_step, value = max(finite, key=lambda item: item[1])
    evidence = (
        f"lr x sharpness = {fmt(value)} at its largest (step {peak_step}; last measurement {fmt(series[-1][1])}); "
        f"limit {note}."
    )
    if limit is None:
        return Judgement("unknown", value, evidence + diverged, tag, facts)
    band = limits["band"]
    verdict = (
        "holds" if value < (1 - band) * limit else "borderline" if value <= (1 + band) * limit else "violated"
    )
    # the learning rate to advise: limit / the sharpness where the step first went past the limit (later
    # sharpness is that of a catapulted or diverging network, flatter or sharper than the one the lr was for)
    first_over = next((step for step, v in finite if v > limit), peak_step)
    sharpness = dict(run.scalars.get("landscape/sharpness", [])).get(first_over)
    if sharpness is None or not math.isfinite(sharpness) or sharpness <= 0:
        sharpness, first_over = run.last("landscape/sharpness", finite=True), None
    if sharpness and sharpness > 0:
        where = "" if first_over is None else f" at step {first_over}"
        facts["lr_to"] = (
            f" to at most {fmt(limit / sharpness)} (= {limit:.3g} / sharpness {fmt(sharpness)}{where})"
        )
    if verdict == "borderline":
        evidence += " At the edge of stability: training goes on, but not monotonically."
    elif verdict == "violated" and first_over is not None:
        evidence += f" First past the limit at step {first_over}, sharpness {fmt(sharpness)}."
    evidence += diverged
    if broken and verdict == "holds":
        evidence += (
            " lr x sharpness was under the limit at every finite measurement: the step does not explain it."
        )
    return Judgement(verdict, value, evidence, tag, facts)


@check("input_scale")
def input_scale(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    layers = run.layers("landscape/input_rms")
    if not layers:
        return None
    names = list(layers)  # in the order logged: named_modules order, the first layer first
    first = names[0]
    tag = f"landscape/input_rms/{first}"
    value = run.last(tag, finite=True)
    if value is None:
        evidence = f"`{tag}` is not finite at any measurement: NaN or Inf in the inputs (see 'Finite loss')."
        return Judgement("unknown", run.last(tag), evidence, tag, {})
    low, high, band = limits["low"], limits["high"], limits["band"]
    facts = {"first_layer": first, "rms": value, "curvature_factor": value**2}
    evidence = f"the first layer measured, {first}, sees inputs of RMS {fmt(value)} (standardised data: 1)"
    following = names[1] if len(names) > 1 else None
    if value > high / band and following is not None and is_normalisation_layer(following):
        evidence += (
            f"; {following}, a normalisation layer, takes {first}'s output, so the scale does not reach the loss "
            "(BatchNorm is invariant to the scale of its input)."
        )
        return Judgement("holds", value, evidence, tag, facts)
    if low <= value <= high:
        verdict = "holds" if low * band <= value <= high / band else "borderline"
    else:
        verdict = "violated"
    facts["how"] = ("far " if verdict == "violated" else "") + ("above" if value > 1 else "below")
    if verdict != "holds":
        evidence += (
            f", {facts['how']} it: the first layer's curvature is about {fmt(value**2)} times that of standardised "
            "inputs, so learning rates tuned for those do not transfer."
        )
    else:
        evidence += "."
    return Judgement(verdict, value, evidence, tag, facts)


@check("activation_conditioning")
def activation_conditioning(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    layers = run.layers("landscape/input_condition")
    values = {name: run.last(f"landscape/input_condition/{name}", finite=True) for name in layers}
    plain = {n: v for n, v in values.items() if v is not None and not is_normalisation_layer(n)}
    if not plain:
        return None
    deficient = [n for n, v in plain.items() if v >= limits["rank_deficient"]]
    judged = {n: v for n, v in plain.items() if n not in deficient}
    has_norm = any(is_normalisation_layer(name) for name in layers)
    note = (
        f"; rank-deficient, not judged (fewer probe examples than features, or dead units): {', '.join(deficient)}"
        if deficient
        else ""
    )
    if not judged:
        return Judgement(
            "unknown",
            max(plain.values()),
            "every input covariance is rank-deficient" + note + ".",
            f"landscape/input_condition/{deficient[0]}",
            {},
        )
    worst = max(judged, key=judged.get)
    value, limit = judged[worst], limits["limit"]
    facts = {"worst_layer": worst, "norm_note": "" if has_norm else " (the model has no normalisation layer)"}
    facts["first_layer" if worst == next(iter(plain)) else "hidden_layer"] = worst
    ranked = sorted(judged.items(), key=lambda item: -item[1])[:3]
    evidence = (
        "largest input condition numbers: "
        + ", ".join(f"{n} {fmt(v)}" for n, v in ranked)
        + ("" if has_norm else "; no normalisation layer among the layers measured")
        + note
        + "."
    )
    verdict = "violated" if value >= limit else "borderline" if value >= limits["band"] * limit else "holds"
    return Judgement(verdict, value, evidence, f"landscape/input_condition/{worst}", facts)


@check("batchnorm")
def batchnorm(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    ratios = {}
    for name in run.layers("landscape/input_condition"):
        before = run.last(f"landscape/input_condition/{name}", finite=True)
        after = run.last(f"landscape/output_condition/{name}", finite=True)
        if is_normalisation_layer(name) and before and after:
            ratios[name] = after / before
    if not ratios:
        return None
    typical = math.exp(_mean(math.log(r) for r in ratios.values()))  # the geometric mean: a typical factor
    worst = max(ratios, key=ratios.get)
    evidence = (
        f"output / input condition number at {len(ratios)} normalisation layer(s): geometric mean "
        f"{fmt(typical)}, from {fmt(min(ratios.values()))} to {fmt(ratios[worst])} ({worst})."
    )
    verdict = "holds" if typical <= limits["limit"] else "borderline"
    return Judgement(
        verdict, typical, evidence, "landscape/output_condition/<norm layers>", {"worst_layer": worst}
    )


@check("gradient_health")
def gradient_health(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    layers = run.layers("landscape/grad_to_weight")
    if not layers:
        return None
    last = {name: run.last(f"landscape/grad_to_weight/{name}") for name in layers}
    lr = _learning_rate(run)
    facts: dict = {}
    broken = [name for name, v in last.items() if not math.isfinite(v)]
    finite = {name: v for name, v in last.items() if math.isfinite(v)}
    low = min(finite, key=finite.get) if finite else None
    high = max(finite, key=finite.get) if finite else None
    update = None if (lr is None or high is None) else lr * finite[high]
    largest = _largest_update(run, layers)  # a schedule's end (lr -> 0) would hide an exploding update
    if largest is not None and (update is None or largest[0] > update):
        update, high = largest
    vanishing, exploding, band = limits["vanishing"], limits["exploding"], limits["band"]
    evidence = (
        f"grad/weight from {fmt(finite.get(low))} ({low}) to {fmt(max(finite.values(), default=None))} at the "
        f"end (lr {fmt(lr)})" + ("." if update is None else "; the largest relative update per step, lr x "
        f"grad/weight over the run, is {fmt(update)} ({high}).")
    )
    if broken:
        facts["exploding_layer"] = broken[0]
        return Judgement(
            "violated",
            last[broken[0]],
            f"not finite at {', '.join(broken)}" + (f". {evidence}" if finite else "."),
            f"landscape/grad_to_weight/{broken[0]}",
            facts,
        )
    if finite[low] < vanishing:
        facts["vanishing_layer"] = low
    if update is not None and update > exploding:
        facts["exploding_layer"] = high
    if facts:
        worst = facts.get("vanishing_layer", facts.get("exploding_layer"))
        return Judgement("violated", finite[worst], evidence, f"landscape/grad_to_weight/{worst}", facts)
    if finite[low] < band * vanishing:
        facts["vanishing_layer"] = low
    if update is not None and update > exploding / limits["exploding_band"]:
        facts["exploding_layer"] = high
    verdict = "borderline" if facts else "holds"
    if lr is None:
        evidence += " The learning rate is unknown, so exploding updates are not judged."
    return Judgement(verdict, finite[low], evidence, f"landscape/grad_to_weight/{low}", facts)


# the callbacks' conditions register themselves on import
from lt_theory.report import theory_checks  # noqa: E402, F401
