"""The named choices every interface offers (the CLI's options, the service's form fields and JSON bodies, the
console's forms): defined once, so that a choice added to the core reaches all of them alike."""

from __future__ import annotations

from enum import Enum


class RuleKind(str, Enum):
    """Open-set decision rules (:mod:`facedb.gallery.decision`); margin is the default for models that ship one."""

    fixed = "fixed"
    margin = "margin"
    gallery = "gallery"


class ThumbnailMode(str, Enum):
    """Which face thumbnails the store keeps (:mod:`facedb.gallery.thumbnails`)."""

    off = "off"
    enrolled = "enrolled"
    all = "all"


class DetectorKind(str, Enum):
    """The face detector a database's photos go through (facedb/faces/pipeline.py; docs/models.md)."""

    mtcnn = "mtcnn"
    yunet = "yunet"


class OnMultiple(str, Enum):
    """Enrolment of a photo with several faces: refuse it (error), take the largest face, or skip it."""

    error = "error"
    largest = "largest"
    skip = "skip"


class OnOtherMatch(str, Enum):
    """Enrolment of a face that matches another enrolled person: warn, refuse, or allow silently."""

    warn = "warn"
    refuse = "refuse"
    allow = "allow"
