"""``diagnose``: every rule applied to every run of a log directory (or of a live Trainer), as a :class:`Report`."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from lt_theory.report import render
from lt_theory.report.checks import CHECKS, Context, Judgement
from lt_theory.report.read import THEORY_PREFIXES, TRAINING_PREFIXES, RunLog, read_runs
from lt_theory.report.rules import NORMALISE, RULES, STAGE_LABELS, STAGES, Rule

__all__ = ["VERDICTS", "Finding", "Report", "diagnose", "log_directory"]

VERDICTS = ("holds", "borderline", "violated", "unknown")
REPORT_TAG = "report/diagnosis"
_FIELD = re.compile(r"\{(\w+)(?::([^{}]*))?\}")
_SEE = re.compile(r" \(see '[^']*'\)$")


class Finding(NamedTuple):
    """One condition judged on one run.

    Attributes:
        condition: the condition (a rule's ``condition``).
        quantity: the tag the value comes from.
        value: the number judged (NaN when there is none).
        reference: the reference it is judged against, with the run's numbers filled in.
        verdict: ``"holds"``, ``"borderline"``, ``"violated"`` or ``"unknown"``.
        evidence: the numbers behind the verdict, in a sentence or two.
        advice: what to try, in order: debugging, then data, then the algorithm (empty when it holds).
        source: where the reference comes from.
        run: the run, relative to the diagnosed directory (``"."`` for the directory itself).
    """

    condition: str
    quantity: str
    value: float
    reference: str
    verdict: str
    evidence: str
    advice: tuple[str, ...]
    source: str
    run: str = "."


@dataclass
class Report:
    """The findings of a diagnosis, with the runs they were read from.

    Attributes:
        source: the diagnosed log directory.
        findings: one :class:`Finding` per condition and run, runs in path order, conditions in rule order.
        runs: the runs read (their images go into the HTML report).
        skipped: runs under ``source`` without lt_theory tags.
        leads: ``{run: advice item}`` for each run whose training-loss symptom (a non-finite loss, a loss that
            does not fall, a loss at chance) a violated measured cause explains: that cause's first advice,
            which :meth:`advice` puts first (see :mod:`lt_theory.report.rules`, "Measured causes").
    """

    source: Path
    findings: list[Finding]
    runs: list[RunLog] = field(default_factory=list, repr=False)
    skipped: list[str] = field(default_factory=list)
    leads: dict[str, str] = field(default_factory=dict)

    def finding(self, condition: str, run: str | None = None) -> Finding:
        """The finding of ``condition`` (in ``run``, else the only run that has it).

        Raises:
            KeyError: when there is no such finding, or several runs have it and ``run`` is None.
        """
        found = [f for f in self.findings if f.condition == condition and run in (None, f.run)]
        if len(found) != 1:
            runs = [f.run for f in found]
            raise KeyError(
                f"{len(found)} findings of {condition!r}{' in ' + run if run else ''} (runs {runs}); "
                f"the conditions found: {sorted({f.condition for f in self.findings})}"
            )
        return found[0]

    def verdicts(self) -> dict[str, str]:
        """``{condition: verdict}``, keys ``"<run>: <condition>"`` when there are several runs."""
        several = len({f.run for f in self.findings}) > 1
        return {(f"{f.run}: {f.condition}" if several else f.condition): f.verdict for f in self.findings}

    def advice(self) -> list[str]:
        """Every advice item of the violated, then borderline, findings, once each: a measured cause that explains
        a run's training-loss symptom first (:attr:`leads`), then debugging, data, algorithm."""
        ordered = sorted(
            (f for f in self.findings if f.verdict in ("violated", "borderline")),
            key=lambda f: f.verdict != "violated",
        )
        items = [_SEE.sub("", item) for f in ordered for item in f.advice]  # a copied item once, as itself
        rank = {STAGE_LABELS[s]: i for i, s in enumerate(STAGES)}
        leads = list(dict.fromkeys(self.leads.values()))
        unique = [item for item in dict.fromkeys(items) if item not in leads]
        return leads + sorted(unique, key=lambda item: rank.get(item.split(":", 1)[0], len(STAGES)))

    def to_markdown(self, details: bool = True) -> str:
        """The verdict table (condition, value, reference, verdict, advice), then what to try and the evidence."""
        return render.markdown(self, details)

    def to_html(self) -> str:
        """A self-contained HTML page: the findings and the callbacks' figures as embedded PNG data URIs."""
        return render.html(self)

    def write(self, directory: str | os.PathLike | None = None, tensorboard: bool = True) -> dict[str, Path]:
        """Write ``report.md`` and ``report.html`` and, with ``tensorboard``, the text ``report/diagnosis`` of
        each run into that run's directory (a new event file, at the run's last step).

        Args:
            directory: where the two files go; None for the diagnosed directory.
            tensorboard: also write the TensorBoard text.

        Returns:
            ``{"markdown": path, "html": path}``.
        """
        out = Path(self.source if directory is None else directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / "report.md", "html": out / "report.html"}
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        paths["html"].write_text(self.to_html(), encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            for run in self.runs:
                leads = {name: item for name, item in self.leads.items() if name == run.name}
                mine = Report(self.source, [f for f in self.findings if f.run == run.name], leads=leads)
                if mine.findings:
                    with SummaryWriter(str(run.directory), filename_suffix=".report") as writer:
                        writer.add_text(REPORT_TAG, mine.to_markdown(), global_step=run.last_step)
        return paths


def _fill(template: str, values: Mapping[str, Any], strict: bool) -> str | None:
    """``template`` with its ``{name:spec}`` fields filled; a missing one is None (strict) or ``?``."""

    def one(match: re.Match) -> str:
        name, spec = match.group(1), match.group(2) or ""
        if name not in values:
            if strict:
                raise KeyError(name)
            return "?"
        return format(values[name], spec)

    try:
        return _FIELD.sub(one, template)
    except (KeyError, ValueError, TypeError):
        return None


def _advice(rule: Rule, judgement: Judgement) -> tuple[str, ...]:
    if judgement.verdict not in ("violated", "borderline"):
        return ()
    items = rule.advice
    if judgement.verdict == "borderline" and rule.borderline_advice is not None:
        items = rule.borderline_advice
    values = {**rule.limits, **judgement.facts}
    filled = [(stage, _fill(text, values, strict=True)) for stage, text in items]
    ordered = sorted((item for item in filled if item[1]), key=lambda item: STAGES.index(item[0]))
    return tuple(f"{STAGE_LABELS[stage]}: {text}" for stage, text in ordered)


def _finding(rule: Rule, judgement: Judgement, run: RunLog) -> Finding:
    reference = _fill(rule.reference, {**rule.limits, **judgement.facts}, strict=False) or rule.reference
    value = math.nan if judgement.value is None else float(judgement.value)
    return Finding(
        rule.condition,
        judgement.quantity,
        value,
        reference,
        judgement.verdict,
        judgement.evidence,
        _advice(rule, judgement),
        rule.source,
        run.name,
    )


def _explaining_cause(findings: list[tuple[Rule, Finding]]) -> Finding | None:
    """The run's violated measured cause of the earliest stage (rule order within a stage) when a violated
    training-loss symptom needs explaining, else None."""
    if not any(rule.symptom and f.verdict == "violated" for rule, f in findings):
        return None
    causes = [(r, f) for r, f in findings if r.cause and f.verdict == "violated" and f.advice]
    return min(causes, key=lambda item: STAGES.index(item[0].stage))[1] if causes else None


def _debugging_first(findings: list[tuple[Rule, Finding]], cause: Finding | None) -> list[Finding]:
    """Put the first advice of a run's violated earlier-stage findings (a bug, then the data) ahead of the advice
    of its later-stage violated findings: what practitioners check first comes first everywhere. A symptom that
    ``cause`` explains is led by the cause's first advice, keeps only its bug-stage items after it, and puts
    nothing ahead of the other findings."""
    explained = cause is not None
    out = []
    for rule, finding in findings:
        if finding.verdict == "violated" and explained and rule.symptom:
            bug = tuple(item for item in finding.advice if item.startswith(f"{STAGE_LABELS['bug']}:"))
            finding = finding._replace(advice=(f"{cause.advice[0]} (see '{cause.condition}')", *bug))
        elif finding.verdict == "violated":
            stage = STAGES.index(rule.stage)
            earlier = [
                f"{f.advice[0]} (see '{f.condition}')"
                for r, f in findings
                if f.verdict == "violated"
                and f.advice
                and STAGES.index(r.stage) < stage
                and not (explained and r.symptom)
            ]
            finding = finding._replace(advice=tuple(dict.fromkeys(earlier)) + finding.advice)
        out.append(finding)
    return out


def _diagnose_run(run: RunLog, context: Context) -> tuple[list[Finding], str | None]:
    """The run's findings, and the advice item that leads it (the first advice of a cause that explains a
    symptom), or None."""
    judged = []
    for rule in RULES:
        judgement = CHECKS[rule.key](run, rule.limits, context)
        if judgement is not None:
            if judgement.verdict not in VERDICTS:
                raise RuntimeError(
                    f"check {rule.key!r} gave verdict {judgement.verdict!r}, not one of {VERDICTS}"
                )
            judged.append((rule, _finding(rule, judgement, run)))
    if any(rule.key == "input_scale" and f.verdict != "unknown" for rule, f in judged):
        generic = f"{STAGE_LABELS[NORMALISE[0]]}: {NORMALISE[1]}"  # the input scale was measured: it says
        judged = [(r, f._replace(advice=tuple(a for a in f.advice if a != generic))) for r, f in judged]
    cause = _explaining_cause(judged)
    return _debugging_first(judged, cause), None if cause is None else cause.advice[0]


def log_directory(trainer) -> Path:
    """The ``log_dir`` of the trainer's first TensorBoardLogger, after flushing what it holds.

    Raises:
        ValueError: if the trainer has no TensorBoardLogger.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not loggers:
        names = ", ".join(type(lg).__name__ for lg in trainer.loggers) or "no logger"
        raise ValueError(
            f"diagnose(trainer) reads what the callbacks logged to TensorBoard, but the trainer has {names}. "
            "Add `TensorBoardLogger(save_dir=...)` to its loggers, or pass a log directory."
        )
    loggers[0].experiment.flush()
    return Path(loggers[0].log_dir)


def diagnose(source, num_classes: int | None = None) -> Report:
    """Judge every condition the rules cover on every run of a log directory, or on a live Trainer's run.

    A log directory is read back from its TensorBoard event files, so this works after the fact on any run made
    with the lt_theory callbacks. Every directory under ``source`` holding event files is a run and is diagnosed
    on its own (the versions of an experiment, the widths and the ``aggregate`` of a sweep, an IMP run and its
    controls, which are compared with each other); runs without lt_theory tags are skipped. A Trainer is
    diagnosed from its first TensorBoardLogger's ``log_dir``, flushed first.

    Args:
        source: a log directory (``str`` or path), or a ``Trainer`` with a TensorBoardLogger.
        num_classes: the number of classes, for the chance-level check; None reads it from the runs'
            ``hparams.yaml`` (or the Trainer's module).

    Returns:
        The :class:`Report`.

    Raises:
        FileNotFoundError: if ``source`` is not a directory.
        ValueError: if it holds no event files, or none with lt_theory tags (the message names the prefixes
            looked for); a Trainer without a TensorBoardLogger.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> folder = tempfile.mkdtemp()
        >>> with SummaryWriter(folder) as writer:
        ...     for k, barrier in [(0, 0.31), (500, 0.25)]:
        ...         writer.add_scalar("lmc/test_error_barrier", barrier, global_step=k)
        >>> finding = diagnose(folder).finding("Stability to SGD noise (LMC)")
        >>> finding.verdict, finding.value, finding.reference
        ('violated', 0.25, '< 0.02 at some k')
        >>> print(finding.evidence)
        error barriers k=0: 0.31, k=500: 0.25: not stable at any k measured.
    """
    if hasattr(source, "loggers") and hasattr(source, "fit"):
        module = getattr(source, "lightning_module", None)
        if num_classes is None and isinstance(getattr(module, "num_classes", None), int):
            num_classes = module.num_classes
        source = log_directory(source)
    root = Path(source)
    runs = read_runs(root)
    prefixes = (*THEORY_PREFIXES, *TRAINING_PREFIXES)
    if not runs:
        raise ValueError(f"no TensorBoard event files (events.out.tfevents.*) under {str(root)!r}")
    usable = [run for run in runs if run.has_prefix(*prefixes)]
    if not usable:
        raise ValueError(
            f"no lt_theory tags in the {len(runs)} run(s) under {str(root)!r}: looked for tags starting with "
            f"{', '.join(p + '/' for p in prefixes)} (the lt_theory callbacks, the sweep's aggregate and "
            "ClassificationModule write them)"
        )
    context = Context(runs=usable, num_classes=num_classes)
    findings, leads = [], {}
    for run in usable:
        found, lead = _diagnose_run(run, context)
        findings += found
        if lead is not None:
            leads[run.name] = lead
    skipped = [run.name for run in runs if run not in usable]
    return Report(root, findings, usable, skipped, leads)
