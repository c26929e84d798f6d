"""Labelled data on disk: LFW pairs and people files, folders with one sub-folder per person, and the
open-set split of such a folder into gallery, genuine probes and impostor probes (strangers).

Where the data lives is always given explicitly (an option, or ``FACEDB_TEST_DATA`` via :func:`data_root`):
the product never assumes a path relative to the current directory.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FaceDBError, InvalidInputError

#: The environment variable naming a folder laid out like ``../shared/facedata`` (``lfw_deepfunneled/``,
#: ``lfw_protocol/``, ...): the default data for ``facedb eval`` and ``facedb calibrate``.
DATA_ENV = "FACEDB_TEST_DATA"


def data_root(what: str) -> Path:
    """The labelled-data folder from ``$FACEDB_TEST_DATA``, or InvalidInputError saying what to give."""
    root = os.environ.get(DATA_ENV)
    if not root:
        raise InvalidInputError(f"no {what} given: pass it as an option, or set {DATA_ENV} to a folder holding "
                                "lfw_deepfunneled/ and lfw_protocol/")
    return Path(root)


@dataclass(frozen=True)
class Pair:
    a: Path
    b: Path
    same: bool
    fold: int


def lfw_path(lfw_dir: Path, name: str, number: str) -> Path:
    return lfw_dir / name / f"{name}_{int(number):04d}.jpg"


def read_pairs(pairs_file: Path, lfw_dir: Path) -> list[Pair]:
    """LFW pairs files: a header line (``folds count`` or ``count``), then ``name i j`` (same person) or
    ``name1 i name2 j`` (different people). ``pairs.txt`` has 10 folds of count same + count different."""
    try:
        lines = [ln.split() for ln in pairs_file.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise FaceDBError(f"cannot read pairs file {pairs_file}: {exc.strerror or exc}") from None
    if not lines:
        raise FaceDBError(f"{pairs_file} is empty")
    header, rows = lines[0], lines[1:]
    try:
        per_fold = 2 * int(header[-1])
    except ValueError:
        raise FaceDBError(f"{pairs_file}: the first line is not an LFW pairs header") from None
    pairs = []
    for i, row in enumerate(rows):
        fold = i // per_fold if len(header) == 2 else 0
        try:
            if len(row) == 3:
                pairs.append(Pair(lfw_path(lfw_dir, row[0], row[1]), lfw_path(lfw_dir, row[0], row[2]), True, fold))
            elif len(row) == 4:
                pairs.append(Pair(lfw_path(lfw_dir, row[0], row[1]), lfw_path(lfw_dir, row[2], row[3]), False,
                                  fold))
            else:
                raise ValueError
        except ValueError:
            raise FaceDBError(f"{pairs_file}: line {i + 2} is not a pair") from None
    return pairs


def read_people(people_file: Path) -> set[str]:
    """Names from an LFW people file (``peopleDevTrain.txt``: a count line, then ``name count`` lines)."""
    try:
        rows = [ln.split() for ln in people_file.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise FaceDBError(f"cannot read {people_file}: {exc.strerror or exc}") from None
    return {unicodedata.normalize("NFC", r[0]) for r in rows if len(r) == 2 and not r[0].isdigit()}


def labelled_folder(folder: Path, people: set[str] | None = None) -> tuple[list[Path], list[str]]:
    """(photo paths, person labels) of a folder with one sub-folder per person (only ``people``, if given).
    Labels are the folder names in Unicode NFC, as the store and :func:`read_people` give names, so that a
    folder copied from a Mac (NFD names) matches a people file typed elsewhere."""
    from ..faces.pipeline import list_folder

    paths: list[Path] = []
    labels: list[str] = []
    for raw, files in list_folder(folder).people:
        name = unicodedata.normalize("NFC", raw)
        if people is None or name in people:
            paths += files
            labels += [name] * len(files)
    return paths, labels


#: LFW folders whose photos show a person enrolled under another folder: scored as "strangers" they are false
#: positives of the labels, not of the model. Found by reading the highest-scoring strangers of the open-set protocol
#: (scripts/open_set_report.py, sface and dlib-resnet agree) and checking each photo by eye
#: (docs/thresholds-and-accuracy.md).
#: Identical twins (Ashley/Mary-Kate Olsen, Isabela/Carolina Moraes) and sisters are different people and stay.
LFW_NOT_STRANGERS: dict[str, tuple[str, str]] = {
    "Sung_Hong_Choi": ("Choi_Sung-hong", "the same name, Korean order"),
    "Hasan_Wirayuda": ("Hassan_Wirajuda", "the same name, another spelling"),
    "Mireya_Elisa_Moscoso_Rodriguez": ("Mireya_Moscoso", "the same person's full name"),
    "Wang_Nan": ("Nan_Wang", "the same name, Chinese order"),
    "John_Gruden": ("Jon_Gruden", "the same name, misspelt"),
    "Yingfan_Wang": ("Wang_Yingfan", "the same name, Chinese order"),
    "Shavon_Earp": ("Diana_Taurasi", "the one photo shows Diana Taurasi"),
    "Carlos_Ruckauf": ("Eduardo_Duhalde", "the one photo shows Eduardo Duhalde"),
    "Anja_Paerson": ("Janica_Kostelic", "the one photo shows Janica Kostelic (Croatian sponsor's headband)"),
}


@dataclass
class Split:
    """Who is enrolled with which photos, and the genuine and impostor probes (indices into a photo list)."""

    gallery: dict[str, list[int]] = field(default_factory=dict)  # person -> indices of enrolled photos
    genuine: list[tuple[str, int]] = field(default_factory=list)  # (person, photo index)
    impostor: list[int] = field(default_factory=list)  # photo indices of people not enrolled
    strangers: str = "single-photo people"  # where the impostors came from


def identify_split(labels: list[str], enroll: int, rng: np.random.Generator, people: set[str] | None = None,
                   strangers: float = 0.0, not_strangers: Iterable[str] = ()) -> Split:
    """Enrol ``enroll`` random photos of each person with more than ``enroll`` photos; their other photos are
    genuine probes; every photo of the other people is an impostor probe. ``people`` restricts to a subset.

    ``strangers`` (a share in [0, 1)): hold out that share of the people who *could* be enrolled as strangers
    too (all their photos become impostor probes), for folders where everyone has several photos.

    ``not_strangers``: people whose photos are neither probes nor strangers (e.g. :data:`LFW_NOT_STRANGERS`, people
    filed under a second name); the random draws are the same with or without them.
    """
    dropped = set(not_strangers)
    by_person: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        if people is None or name in people:
            by_person.setdefault(name, []).append(i)
    eligible = sorted(n for n, idx in by_person.items() if len(idx) > enroll)
    held: set[str] = set()
    if strangers:
        if not 0 < strangers < 1:
            raise InvalidInputError("the share of people held out as strangers is in (0, 1)")
        count = int(round(strangers * len(eligible)))
        held = set(rng.permutation(eligible)[:count].tolist())
    split = Split(strangers=f"{strangers:.0%} of the people held out, and single-photo people" if strangers
                  else "single-photo people")
    for name in sorted(by_person):
        idx = by_person[name]
        if len(idx) > enroll and name not in held:
            chosen = set(rng.choice(idx, enroll, replace=False).tolist())
            split.gallery[name] = sorted(chosen)
            split.genuine += [(name, i) for i in idx if i not in chosen]
        elif name not in dropped:
            split.impostor += idx
    return split
