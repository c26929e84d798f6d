"""Face image quality: measurements of one detected face and its aligned crop, and the verdict whether a face
is usable for a decision at all.

Pure numpy on what the pipeline already has (the face's box, detector score and 5 landmarks in the photo's
frame; the aligned crop the embedder reads). Every measure is named in the units it is computed in, so that a
refusal can say why ("face 24 px wide, at least 40 needed"). The floors in :data:`FLOORS` were chosen by
measurement (``scripts/quality_report.py``; docs/thresholds-and-accuracy.md): each one removes wrong accepts on
LFW and on Yale's directional-light photos at a stated cost in genuine probes turned away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..records import _Record


@dataclass(frozen=True)
class FaceQuality(_Record):
    """Measurements of one face. ``problems`` lists each floor it fails; ``usable`` is True when none."""

    face_px: float  # the face box's shorter side, in photo pixels
    det_score: float  # the detector's probability that this is a face, 0..1
    sharpness: float  # variance of the Laplacian of the crop's grey centre, divided by its variance
    brightness: float  # mean grey level of the crop's centre, 0..255
    contrast: float  # standard deviation of that grey level, 0..255
    clipped: float  # share of the centre's pixels at or below 5 or at or above 250
    light_asymmetry: float  # |mean(left half) - mean(right half)| / mean, of the crop's centre
    yaw: float  # nose offset from the eyes' midpoint along the eye line, in inter-ocular distances (0 = frontal)
    roll: float  # angle of the eye line, degrees
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems


#: (measure, minimum or maximum, value): the floors a face must meet to be decided on. Measured choices; see
#: the module docstring.
FLOORS: list[tuple[str, str, float]] = [
    ("face_px", "min", 40.0),
    ("contrast", "min", 18.0),
    ("light_asymmetry", "max", 0.45),
    ("clipped", "max", 0.35),
    ("yaw", "max", 0.45),
]


def _grey(crop: np.ndarray) -> np.ndarray:
    c = np.asarray(crop, dtype=np.float32)
    if c.ndim == 3:
        c = c[..., 0] * 0.299 + c[..., 1] * 0.587 + c[..., 2] * 0.114
    h, w = c.shape
    # the centre (the face itself, without the padding aligners add around it)
    return c[h // 6: h - h // 6, w // 6: w - w // 6]


def _clipped(g: np.ndarray) -> float:
    """The share of grey values at or below 5 or at or above 250 (under- or over-exposed)."""
    return float(np.mean((g <= 5) | (g >= 250)))


def measure(crop: np.ndarray, box: tuple[float, float, float, float], det_score: float, landmarks: np.ndarray,
            floors: list[tuple[str, str, float]] | None = None) -> FaceQuality:
    """The quality of one face: ``crop`` is the aligned crop (H, W, 3) uint8, ``box`` (x1, y1, x2, y2) and
    ``landmarks`` (5, 2) in photo pixels (left eye, right eye, nose, mouth corners), ``det_score`` in [0, 1]."""
    g = _grey(crop)
    mean = float(g.mean())
    std = float(g.std())
    lap = g[1:-1, 1:-1] * 4 - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    sharp = float(lap.var() / max(std * std, 1e-6))
    clipped = _clipped(g)
    half = g.shape[1] // 2
    asym = float(abs(g[:, :half].mean() - g[:, half:].mean()) / max(mean, 1e-6))
    lm = np.asarray(landmarks, dtype=np.float64)
    eyes = lm[1] - lm[0]
    iod = float(np.hypot(*eyes))
    if iod > 1e-6:
        along = eyes / iod
        yaw = float(abs(np.dot(lm[2] - (lm[0] + lm[1]) / 2, along)) / iod)
        roll = float(np.degrees(np.arctan2(eyes[1], eyes[0])))
    else:  # no usable landmarks (a detector without them): pose unknown, not penalised
        yaw, roll = 0.0, 0.0
    q = {"face_px": float(min(box[2] - box[0], box[3] - box[1])), "det_score": float(det_score),
         "sharpness": sharp, "brightness": mean, "contrast": std, "clipped": clipped, "light_asymmetry": asym,
         "yaw": yaw, "roll": roll}
    return FaceQuality(**q, problems=problems(q, FLOORS if floors is None else floors))


def featureless(pixels: np.ndarray) -> str | None:
    """Why a whole photo cannot be a face crop (too little contrast, or mostly over- or under-exposed: a blank
    frame, a lens cap), or None. Crop mode takes a photo whole as the face only when this is None."""
    g = _grey(pixels)
    std = float(g.std())
    clipped = _clipped(g)
    floors = {key: limit for key, _, limit in FLOORS}
    if std < floors["contrast"]:
        return f"no face: the photo is nearly uniform (contrast {std:.0f}, at least {floors['contrast']:g})"
    if clipped > floors["clipped"]:
        return f"no face: {clipped:.0%} of the photo is over- or under-exposed (at most {floors['clipped']:.0%})"
    return None


_WORDS = {"face_px": ("face {v:.0f} px across", "px"), "contrast": ("contrast {v:.0f}", ""),
          "light_asymmetry": ("light {v:.0%} stronger on one side", ""), "clipped": ("{v:.0%} of the face over- or "
                                                                                    "under-exposed", ""),
          "yaw": ("head turned ({v:.2f} inter-ocular distances)", ""), "sharpness": ("sharpness {v:.2f}", ""),
          "det_score": ("detector score {v:.2f}", ""), "brightness": ("brightness {v:.0f}", "")}


def problems(q: dict[str, float], floors: list[tuple[str, str, float]]) -> list[str]:
    """The floors ``q`` fails, each as a sentence with the value and the limit, both in the value's unit
    ("light 81% stronger on one side (at most 45%)")."""
    out = []
    for key, kind, limit in floors:
        v = q[key]
        if (kind == "min" and v < limit) or (kind == "max" and v > limit):
            words = _WORDS.get(key, (key + " {v:.3g}", ""))[0]
            spec = re.search(r"\{v:([^}]*)\}", words)
            shown = spec.group(1) if spec else ".3g"  # the limit in the value's unit and format (the floors are round)
            fmt = shown
            # a value just past its limit would print as the limit itself ("45% (at most 45%)"): add digits
            for _ in range(3):
                if format(v, fmt) != format(limit, fmt):
                    break
                fmt = re.sub(r"\.(\d+)", lambda m: f".{int(m.group(1)) + 1}", fmt)
            what = words.replace(spec.group(0), format(v, fmt)) if spec else f"{key} {format(v, fmt)}"
            out.append(f"{what} ({'at least' if kind == 'min' else 'at most'} {format(limit, shown)})")
    return out
