"""The checks of the callbacks' own conditions: spectral, NTK, LMC, IMP, double descent and the sweep.

See :mod:`lt_theory.report.checks` for what a check takes and returns, and :mod:`lt_theory.report.rules` for
the references and thresholds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

from lt_theory.report.checks import Context, Judgement, check, fmt
from lt_theory.report.read import RunLog
from lt_theory.training.stored import read_json
from lt_theory.training.tickets import read_ticket

__all__ = ["imp_control", "imp_curve"]


def _finite(series) -> list[tuple[int, float]]:
    return [(s, v) for s, v in series if math.isfinite(v)]


# -- spectral ----------------------------------------------------------------------------------------------


@check("lipschitz_growth")
def lipschitz_growth(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    tag = "spectral/lipschitz_upper"
    series = run.scalars.get(tag, [])
    if not series:
        return None
    if not math.isfinite(series[-1][1]):
        return Judgement(
            "violated", series[-1][1], f"`{tag}` is not finite at step {series[-1][0]}.", tag, {}
        )
    first, last = series[0][1], series[-1][1]
    growth = last / first if first > 0 else math.nan
    lower = run.last("spectral/lipschitz_lower", finite=True)
    complexity = run.values("spectral/complexity")
    evidence = (
        f"certified upper bound {fmt(first)} at step {series[0][0]} -> {fmt(last)} at step {series[-1][0]} "
        f"(x{fmt(growth)}); empirical lower bound {fmt(lower)} now"
    )
    if complexity:
        evidence += f"; spectral complexity R_A {fmt(complexity[-1])}"
    return Judgement(
        "unknown", growth, evidence + ". No threshold exists: compare with a healthy run.", tag, {}
    )


@check("margins")
def margins(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    p10, p50 = (run.last(f"spectral/margin_normalized/p{q}") for q in (10, 50))
    if p10 is None or p50 is None:
        return None
    p90 = run.last("spectral/margin_normalized/p90")
    evidence = f"normalised margins on the probe: p10 {fmt(p10)}, p50 {fmt(p50)}, p90 {fmt(p90)}."
    if not (math.isfinite(p10) and math.isfinite(p50)):
        return Judgement("unknown", p10, evidence + " Not finite.", "spectral/margin_normalized/p10", {})
    if p50 <= 0:
        return Judgement(
            "violated",
            p50,
            evidence + " Half the probe or more is misclassified.",
            "spectral/margin_normalized/p50",
            {},
        )
    verdict = "holds" if p10 > 0 else "borderline"
    return Judgement(verdict, p10, evidence, "spectral/margin_normalized/p10", {})


# -- NTK --------------------------------------------------------------------------------------------------


@check("ntk")
def ntk(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    tag = "ntk/relative_change"
    if tag not in run.scalars:
        return None
    value = run.last(tag)
    found = re.search(r"\(threshold ([0-9.eE+-]+)\)", run.texts.get("ntk/verdict", ""))
    threshold = float(found.group(1)) if found else limits["threshold"]
    facts = {"threshold": threshold}
    if not math.isfinite(value):
        return Judgement("violated", value, f"`{tag}` is not finite at the last measurement.", tag, facts)
    distance = run.last("ntk/distance_from_init", finite=True)
    alignment = run.values("ntk/alignment")
    evidence = (
        f"relative change of the kernel from initialisation {fmt(value)}, kernel distance {fmt(distance)}"
    )
    if len(alignment) >= 2:
        evidence += f"; kernel-target alignment {fmt(alignment[0])} -> {fmt(alignment[-1])}"
    if value >= threshold:
        return Judgement("holds", value, evidence + ": feature learning.", tag, facts)
    return Judgement("borderline", value, evidence + ": lazy (kernel regime).", tag, facts)


# -- linear mode connectivity -----------------------------------------------------------------------------


@check("lmc_stability")
def lmc_stability(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    tag = run.first_present("lmc/test_error_barrier", "lmc/train_error_barrier")
    if tag is None:
        return None
    series, barrier = run.scalars[tag], limits["barrier"]
    facts = {"last_k": series[-1][0]}
    finite = _finite(series)
    if not finite:
        return Judgement(
            "violated", math.nan, f"`{tag}` is NaN at every spawn step: the siblings diverged.", tag, facts
        )
    best_k, best = min(finite, key=lambda item: item[1])
    listed = ", ".join(f"k={k}: {fmt(v)}" for k, v in series)
    stable = next((k for k, v in finite if v < barrier), None)
    if stable is None:
        return Judgement(
            "violated", best, f"error barriers {listed}: not stable at any k measured.", tag, facts
        )
    return Judgement("holds", best, f"error barriers {listed}: stable from k={stable}.", tag, facts)


@check("lmc_init")
def lmc_init(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    tag = run.first_present("lmc/init_test_error_barrier", "lmc/init_train_error_barrier")
    if tag is None:
        return None
    value = run.last(tag)
    if not math.isfinite(value):
        return Judgement("violated", value, f"`{tag}` is not finite at the last measurement.", tag, {})
    largest = max(v for _, v in _finite(run.scalars[tag]))
    evidence = (
        f"error barrier of the path from the initial to the current weights {fmt(value)} now (largest "
        f"{fmt(largest)}); no threshold exists for this path."
    )
    return Judgement("unknown", value, evidence, tag, {})


# -- IMP --------------------------------------------------------------------------------------------------


def imp_curve(run: RunLog) -> dict[float, float]:
    """``{remaining fraction: accuracy}`` of an IMPPruner run's completed levels.

    Read from ``imp/accuracy_by_remaining_bp`` (step = remaining weights in basis points), else by pairing each
    ``imp/accuracy`` with the ``imp/remaining_fraction`` logged last before it.
    """
    if "imp/accuracy_by_remaining_bp" in run.scalars:
        return {bp / 10_000: acc for bp, acc in run.scalars["imp/accuracy_by_remaining_bp"]}
    fractions = run.scalars.get("imp/remaining_fraction", [])
    curve = {}
    for step, accuracy in run.scalars.get("imp/accuracy", []):
        before = [f for s, f in fractions if s < step]
        curve[before[-1] if before else 1.0] = accuracy
    return curve


def imp_control(run: RunLog, context: Context) -> str | None:
    """The control an IMPPruner run ran (``random_reinit``, ``random_prune``), read from its first ticket file
    (``<run>/imp/ticket_level*.pt``); None for IMP itself or when no ticket is found there."""
    key = ("imp_control", str(run.directory))
    if key not in context.cache:
        tickets = sorted((Path(run.directory) / "imp").glob("ticket_level*.pt"))
        control = None
        if tickets:
            try:
                control = read_ticket(tickets[0]).get("control")
            except ValueError:
                control = None
        context.cache[key] = control
    return context.cache[key]


@check("imp_matching")
def imp_matching(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    curve = imp_curve(run)
    tag = "imp/accuracy_by_remaining_bp" if "imp/accuracy_by_remaining_bp" in run.scalars else "imp/accuracy"
    if not curve:
        return None
    control = imp_control(run, context)
    who = f" (control run: {control})" if control else ""
    dense = curve[max(curve)]
    levels = ", ".join(f"{100 * f:.3g}%: {fmt(a)}" for f, a in sorted(curve.items(), reverse=True))
    evidence = f"accuracy by weights remaining{who}: {levels}; dense {fmt(dense)}."
    diverged = run.last("imp/diverged_level")
    if diverged is not None:
        return Judgement(
            "violated",
            diverged,
            evidence + f" Level {int(diverged)} diverged.",
            "imp/diverged_level",
            {"diverged_level": int(diverged)},
        )
    pruned = {f: a for f, a in curve.items() if f < 1 and f != max(curve)}
    if not pruned:
        return Judgement("unknown", math.nan, evidence + " No pruned level has finished yet.", tag, {})
    matching = [f for f, a in pruned.items() if a >= dense - limits["tolerance"]]
    if matching:
        return Judgement(
            "holds",
            min(matching),
            evidence + f" Sparsest matching ticket: {100 * min(matching):.3g}% of the weights.",
            tag,
            {},
        )
    return Judgement("violated", math.nan, evidence + " No pruned level matches the dense accuracy.", tag, {})


@check("imp_controls")
def imp_controls(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    curve = imp_curve(run)
    if not curve or imp_control(run, context) is not None:
        return None
    tag = "imp/accuracy_by_remaining_bp"
    controls = [(imp_control(other, context), other) for other in context.runs if other is not run]
    controls = [(kind, other) for kind, other in controls if kind is not None and imp_curve(other)]
    if not controls:
        return Judgement(
            "unknown",
            math.nan,
            "no control run found next to this one: run IMPPruner(control="
            "'random_reinit' / 'random_prune', reference_tickets=<this run's imp/>) into the same "
            "folder and diagnose the folder.",
            tag,
            {},
        )
    gaps, parts = [], []
    for kind, other in controls:
        theirs = imp_curve(other)
        common = [f for f in curve if f in theirs and f < 1]
        if common:
            level = min(common)
            gaps.append(curve[level] - theirs[level])
            parts.append(
                f"{kind} ({other.name}) at {100 * level:.3g}%: IMP {fmt(curve[level])} vs "
                f"{fmt(theirs[level])}"
            )
    if not gaps:
        return Judgement(
            "unknown", math.nan, "the controls share no pruned level with this run yet.", tag, {}
        )
    gap, tolerance = min(gaps), limits["tolerance"]
    verdict = "holds" if gap > tolerance else "borderline" if gap > 0 else "violated"
    return Judgement(verdict, gap, "; ".join(parts) + f" (smallest gap {fmt(gap)}).", tag, {})


# -- double descent ---------------------------------------------------------------------------------------


@check("dd_epochwise")
def dd_epochwise(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    test = _finite(run.scalars.get("dd/test_error", []))
    if len(test) < 2:
        return None
    tag, tolerance = "dd/test_error", limits["tolerance"]
    interpolation = run.scalars.get("dd/interpolation_epoch")
    if not interpolation:
        train = run.last("dd/train_error", finite=True)
        return Judgement(
            "unknown",
            test[-1][1],
            f"the training set is not interpolated yet (train error "
            f"{fmt(train)}); the double-descent peak comes near interpolation.",
            tag,
            {},
        )
    at_step, epoch = interpolation[0][0], int(interpolation[0][1])
    before = [item for item in test if item[0] <= at_step] or test[:1]
    after = [item for item in test if item[0] >= at_step] or test[-1:]
    best_step, best = min(before, key=lambda item: item[1])
    last, peak = test[-1][1], max(v for _, v in after)
    facts = {"best": best, "best_step": best_step}
    evidence = (
        f"interpolated at epoch {epoch} (step {at_step}); best test error before it {fmt(best)} (step "
        f"{best_step}), highest after it {fmt(peak)}, final {fmt(last)}."
    )
    rise = last - best
    if rise <= tolerance:
        return Judgement("holds", rise, evidence, tag, facts)
    if last >= peak - tolerance:
        return Judgement(
            "violated",
            rise,
            evidence + " The test error rose past interpolation and has not come "
            "down: the run sits at the peak.",
            tag,
            facts,
        )
    return Judgement("borderline", rise, evidence + " The second descent has begun.", tag, facts)


WIDTH_CURVE = "dd/test_error_by_width"
"""The sweep aggregate's model-wise test error (step = width); a crossed sweep adds ``/<axis>=<value>``."""


def _aggregate_tolerance(run: RunLog, suffix: str) -> float | None:
    """The two standard errors lt_theory.sweep used, from ``aggregate.json`` (either format), for one curve."""
    path = Path(run.directory) / "aggregate.json"
    try:
        stored = read_json(path) if path.is_file() else {}
    except ValueError:
        return None
    model_wise = stored.get("model_wise") or {}
    value = stored.get("tolerance", model_wise.get("tolerance")) if not suffix else None
    return float(value) if isinstance(value, (int, float)) else None


def _sweep_tolerance(run: RunLog, suffix: str, best: float, default: float) -> tuple[float, str]:
    """Two standard errors of the test error: from aggregate.json, else ``2 sqrt(e (1 - e) / N)`` with the
    runs' ``num_test``, else lt_theory.sweep's default."""
    stored = _aggregate_tolerance(run, suffix)
    if stored is not None:
        return stored, "aggregate.json"
    sizes = []
    for path in Path(run.directory).parent.glob("*/result.json"):
        try:
            sizes.append(read_json(path).get("num_test"))
        except ValueError:
            continue
    sizes = [n for n in sizes if isinstance(n, int) and n > 0]
    if sizes and 0 <= best <= 1:
        return 2 * math.sqrt(max(best * (1 - best), 1e-12) / min(sizes)), f"N = {min(sizes)} test examples"
    return default, "the test-set size is unknown: lt_theory.sweep's default"


def _width_curve(run: RunLog, suffix: str, limits: Mapping) -> Judgement | None:
    """Whether wider helps on one model-wise curve of the aggregate run."""
    tag = WIDTH_CURVE + suffix
    curve = _finite(run.scalars[tag])
    if len(curve) < 2:
        return None
    (small, e_small), (wide, e_wide) = curve[0], curve[-1]
    best_width, best = min(curve, key=lambda item: item[1])
    tolerance, where = _sweep_tolerance(run, suffix, best, limits["tolerance"])
    interpolation = run.last(f"dd/interpolation_width{suffix}", finite=True)
    facts = {"tolerance": tolerance, "why": ""}
    evidence = (
        f"{'curve ' + suffix[1:] + ': ' if suffix else ''}test error {fmt(e_small)} at width {small} (smallest), "
        f"{fmt(best)} at width {best_width} (lowest), {fmt(e_wide)} at width {wide} (widest); tolerance "
        f"{fmt(tolerance)} ({where}); interpolation threshold "
        f"{'none on this grid' if interpolation is None else int(interpolation)}."
    )
    gap = e_wide - best
    if gap <= tolerance:
        return Judgement("holds", gap, evidence + " Wider helps.", tag, facts)
    widths = [w for w, _ in curve]
    near = interpolation is not None and int(interpolation) in widths
    near = near and widths.index(wide) - widths.index(int(interpolation)) <= 1
    facts["why"] = (
        f" (the widest model is at the interpolation threshold, width {int(interpolation)}, where the peak is)"
        if near
        else f" (the test error rises past width {best_width})"
    )
    plain = f" Wider does not help: the widest model is {fmt(gap)} worse than the best (width {best_width})"
    plain += ", and worse than the smallest." if e_wide > e_small else "."
    return Judgement("violated", gap, evidence + plain, tag, facts)


@check("overparameterisation")
def overparameterisation(run: RunLog, limits: Mapping, context: Context) -> Judgement | None:
    suffixes = [
        t[len(WIDTH_CURVE) :] for t in run.scalars if t == WIDTH_CURVE or t.startswith(WIDTH_CURVE + "/")
    ]
    judged = [j for j in (_width_curve(run, suffix, limits) for suffix in suffixes) if j is not None]
    if not judged:
        return None
    worst = max(judged, key=lambda j: j.value - j.facts["tolerance"])
    if len(judged) == 1:
        return worst
    hurt = sum(j.verdict == "violated" for j in judged)
    note = f" Wider does not help on {hurt} of {len(judged)} curves; the worst is shown." if hurt else ""
    return worst._replace(evidence=worst.evidence + note)
