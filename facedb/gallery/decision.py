"""Open-set decision rules: what a 1:N answer is held to, and why.

A 1:1 threshold does not carry over to 1:N: a stranger facing a gallery of M templates has M chances to score
above it, so the false-positive identification rate (FPIR) grows with the gallery. Three rules:

* ``fixed``: one stored threshold (a default, or one calibrated with ``facedb calibrate``), whatever the gallery
  size. Databases made before the other rules existed keep this rule until told otherwise.
* ``margin`` (new databases, when the model ships its calibration): accept the best person when their
  similarity ``s1`` reaches the stored 1:1 threshold **and** the normalised score ``s1 - 0.5 * s2`` (``s2``: the
  runner-up person's similarity) reaches the margin threshold. A stranger who resembles the best candidate
  usually resembles the runner-up too, so the score's impostor distribution hardly moves as the gallery grows:
  measured on LFW, one margin threshold (calibrated on the peopleDevTrain people) held FPIR at 1.0-1.1% on the
  disjoint peopleDevTest people from 30 to 496 enrolled, where a fixed threshold's FPIR grows from 3% to 52%
  between 30 and 1,678 people (docs/thresholds-and-accuracy.md). With one person enrolled there is no runner-up: the 1:1
  threshold alone decides.
* ``gallery`` (when the model ships an impostor model): the threshold follows the gallery, chosen
  so that a stranger is accepted as *someone* with probability ``target`` (default 1%) at the gallery's current
  number of templates: ``FPIR(t) = 1 - (1 - FAR(t))^M``, so ``t = FAR^-1(1 - (1 - target)^(1/M))``, where
  ``FAR(t)`` is the model's 1:1 impostor score tail (:class:`ImpostorModel`). Treating every template as an
  independent chance is conservative (a person's templates resemble each other), and was checked on LFW at
  gallery sizes 30 to 1,680 (docs/thresholds-and-accuracy.md).

Every answer carries the threshold it was held to and the rule, so a decision can be explained afterwards.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidInputError

RULES = ("fixed", "gallery", "margin")

#: The margin rule's weight of the runner-up: ``score = s1 - MARGIN_WEIGHT * s2``. Chosen on LFW
#: (docs/thresholds-and-accuracy.md): 0.5 made the score's FPIR-1% threshold the same from 30 to 1,678 people
#: (0.484-0.488), where smaller weights let it drift with the gallery size and larger ones cost identification
#: rate.
MARGIN_WEIGHT = 0.5


@dataclass(frozen=True)
class ImpostorModel:
    """The upper tail of a model's 1:1 impostor score distribution (cosine similarities of different people).

    ``scores`` are the highest impostor scores seen, descending; the i-th (0-based) is exceeded or matched by a
    share ``(i + 1) / comparisons`` of all impostor comparisons. Below that table the FAR is read from
    ``quantiles`` ((far, score) points of the body); above its top, log FAR is extrapolated linearly in the
    score from the last tenth of the table (an exponential tail), which is what very large galleries need.
    """

    comparisons: int
    scores: tuple[float, ...]
    quantiles: tuple[tuple[float, float], ...] = ()
    source: str = ""
    flip: bool | None = None

    @classmethod
    def from_scores(cls, impostor: np.ndarray, *, source: str, keep: int = 2000, flip: bool | None = None
                    ) -> ImpostorModel:
        s = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
        if len(s) < 100:
            raise InvalidInputError(f"{len(s)} impostor scores are too few for an impostor model (100 at least)")
        fars = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)
        quantiles = tuple((f, round(float(s[int(f * len(s))]), 6)) for f in fars if int(f * len(s)) >= keep)
        return cls(int(len(s)), tuple(round(float(v), 6) for v in s[:keep]), quantiles, source, flip)

    def to_json(self) -> str:
        return json.dumps({"comparisons": self.comparisons, "scores": list(self.scores),
                           "quantiles": [list(q) for q in self.quantiles], "source": self.source, "flip": self.flip})

    @classmethod
    def from_json(cls, raw: str) -> ImpostorModel:
        d = json.loads(raw)
        return cls(int(d["comparisons"]), tuple(float(v) for v in d["scores"]),
                   tuple((float(a), float(b)) for a, b in d.get("quantiles", ())), d.get("source", ""), d.get("flip"))

    def far(self, threshold: float) -> float:
        """Share of impostor comparisons scoring ``>= threshold``."""
        s = np.asarray(self.scores)
        n = int(np.searchsorted(-s, -threshold, side="right"))  # how many table scores are >= threshold
        if n == 0:
            return self._extrapolate(threshold)
        if n < len(s) or not self.quantiles:
            return n / self.comparisons
        # below the table: log FAR interpolated between the table's bottom and the body's quantiles
        points = [(len(s) / self.comparisons, float(s[-1])), *sorted(self.quantiles)]
        for (f_hi, s_hi), (f_lo, s_lo) in itertools.pairwise(points):
            if threshold >= s_lo:
                w = (s_hi - threshold) / max(s_hi - s_lo, 1e-12)
                return float(math.exp(math.log(f_hi) + w * (math.log(f_lo) - math.log(f_hi))))
        return float(points[-1][0])

    def threshold_for_far(self, far: float) -> float:
        """The smallest threshold whose FAR is at most ``far`` (read from the table; interpolated between the
        body's quantiles below it; extrapolated above it)."""
        if not 0 < far < 1:
            raise InvalidInputError("a false accept rate is in (0, 1)")
        allowed = int(math.floor(far * self.comparisons + 1e-9))
        if allowed < 1:
            return self._invert_tail(far)
        if allowed <= len(self.scores):
            return float(np.nextafter(self.scores[allowed - 1], np.inf))
        points = [(len(self.scores) / self.comparisons, float(self.scores[-1])), *sorted(self.quantiles)]
        for (f_hi, s_hi), (f_lo, s_lo) in itertools.pairwise(points):
            if f_hi <= far <= f_lo:
                w = (math.log(far) - math.log(f_hi)) / max(math.log(f_lo) - math.log(f_hi), 1e-12)
                return float(s_hi + w * (s_lo - s_hi)) + 1e-6  # quantiles are stored to 6 decimals
        return float(points[-1][1])

    def _tail_fit(self) -> tuple[float, float]:
        """(slope, intercept) of log FAR against score over the top tenth of the table."""
        s = np.asarray(self.scores)
        m = max(10, len(s) // 10)
        y = np.log(np.arange(1, m + 1) / self.comparisons)
        slope, intercept = np.polyfit(s[:m], y, 1)
        return float(min(slope, -1e-6)), float(intercept)

    def _extrapolate(self, threshold: float) -> float:
        slope, intercept = self._tail_fit()
        return float(min(1.0 / self.comparisons, math.exp(slope * threshold + intercept)))

    def _invert_tail(self, far: float) -> float:
        slope, intercept = self._tail_fit()
        return float(max(self.scores[0], (math.log(far) - intercept) / slope))


def gallery_threshold(model: ImpostorModel, target_fpir: float, templates: int) -> float:
    """The threshold at which a stranger matches *some* template of a ``templates``-template gallery with
    probability ``target_fpir`` (each template an independent chance with the model's FAR)."""
    if not 0 < target_fpir < 1:
        raise InvalidInputError("the target FPIR is in (0, 1)")
    m = max(int(templates), 1)
    per_comparison = -math.expm1(math.log1p(-target_fpir) / m)  # 1 - (1 - target)^(1/m), exactly for small values
    return model.threshold_for_far(per_comparison)


def predicted_fpir(model: ImpostorModel, threshold: float, templates: int) -> float:
    """FPIR a threshold gives at a gallery of ``templates`` templates, by the same model."""
    far = model.far(threshold)
    return float(-math.expm1(max(int(templates), 1) * math.log1p(-min(far, 1 - 1e-12))))


@dataclass(frozen=True)
class Policy:
    """A rule made concrete for one query (one gallery size): what the engine holds a probe's candidates to.

    Accept the best candidate iff ``s1 >= threshold`` and, for ``margin``, ``s1 - weight * s2 >= margin`` when a
    runner-up exists. ``explanation`` says which rule with which numbers (it goes into every answer)."""

    kind: str
    threshold: float
    weight: float = 0.0
    margin: float | None = None
    explanation: str = ""

    def judge(self, s1: float, s2: float | None) -> tuple[bool, float | None]:
        """(accepted, the normalised score or None) for a probe whose best and runner-up people scored
        ``s1`` and ``s2`` (None when there is no runner-up)."""
        if self.kind != "margin" or self.margin is None or s2 is None:
            return s1 >= self.threshold, None
        score = s1 - self.weight * s2
        return s1 >= self.threshold and score >= self.margin, score

    @property
    def needs_runner_up(self) -> bool:
        return self.kind == "margin"


@dataclass(frozen=True)
class Rule:
    """The decision rule in force: ``fixed`` (the stored threshold), ``margin`` (the stored threshold as a floor
    and the normalised score ``s1 - weight * s2`` held to ``margin``) or ``gallery`` (FPIR ``target`` at the
    current gallery size, with ``impostors``; never below the stored 1:1 threshold)."""

    kind: str = "fixed"
    target: float = 0.01
    impostors: ImpostorModel | None = None
    weight: float = MARGIN_WEIGHT
    margin: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # (stored, templates) -> answer: the gallery rule's inversion of the impostor tail costs ~0.1 ms, and a
    # rule lives as long as the settings it was parsed with (memo.py), so each gallery size is solved once
    _answers: dict[tuple[float, int], Policy] = field(default_factory=dict, compare=False, repr=False)

    def policy(self, stored: float, templates: int) -> Policy:
        """The policy for a gallery of ``templates`` templates, the stored threshold being ``stored``."""
        if self.kind == "gallery" and self.impostors is not None:
            key = (stored, int(templates))
            answer = self._answers.get(key)
            if answer is None:
                t = max(stored, gallery_threshold(self.impostors, self.target, templates))
                answer = Policy("gallery", t, explanation=f"gallery: FPIR {self.target:g} at {templates} templates")
                if len(self._answers) >= 256:
                    self._answers.clear()
                self._answers[key] = answer
            return answer
        if self.kind == "margin" and self.margin is not None:
            return Policy("margin", stored, self.weight, self.margin,
                          f"margin: s1 >= {stored:.4f} and s1 - {self.weight:g} s2 >= {self.margin:.4f}")
        return Policy("fixed", stored, explanation="fixed")

    def threshold(self, stored: float, templates: int) -> tuple[float, str]:
        """(the threshold the best similarity is held to, explanation) for a gallery of ``templates``."""
        p = self.policy(stored, templates)
        return p.threshold, p.explanation
