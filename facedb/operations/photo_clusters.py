"""Clustering the faces of unlabelled photos ("here is a folder of event photos: who is who?"), and storing the
clusters as new people on request.

Every face of every photo is detected and aligned through :func:`facedb.faces.pipeline.prepared_chunks` (with
``FaceChoice.ALL``: in a thread, or in worker processes for large jobs), embedded as the database embeds
(its flip setting), and grouped by :func:`facedb.operations.cluster.cluster`. Nothing here touches the gallery except
:func:`enroll_clusters`, which the caller asks for explicitly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatabaseError, InvalidInputError
from ..faces.images import PHOTO_SUFFIXES, PhotoSource, display_name, is_photo_name
from ..faces.pipeline import FaceChoice, FacePipeline, PreparedFaces, prepared_chunks
from ..gallery.scores import as_unit_rows
from ..gallery.settings import check_threshold
from ..gallery.store import Store
from ..records import Cluster, ClusterFace, ClusterReport, Skipped
from . import cluster as clustering

if TYPE_CHECKING:
    from ..db import FaceDB


def list_photos(folder: Path) -> list[Path]:
    """Every photo file under ``folder``, recursively, sorted; hidden files and folders skipped, links to folders
    not followed. InvalidInputError when ``folder`` is not a folder or holds no photo."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"{display_name(folder)} is not a folder")
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):  # os.walk does not follow links to folders by default
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if is_photo_name(f)]
    if not found:
        raise InvalidInputError(f"{display_name(folder)} holds no photos ({', '.join(PHOTO_SUFFIXES)})")
    return found


def _name(src: PhotoSource, index: int) -> str:
    return display_name(src) if isinstance(src, (str, os.PathLike)) else f"<photo {index}>"


def cluster_photos(pipe: FacePipeline, photos: Sequence[PhotoSource], *, flip: bool, threshold: float,
                   threshold_source: str, rule: str = clustering.DEFAULT_RULE, k: int = clustering.DEFAULT_K,
                   min_size: int = 2, seed: int = 0, workers: int | None = 0,
                   progress: Callable[[int], None] | None = None) -> ClusterReport:
    """Detect every face in ``photos``, embed them (``flip`` as the database does) and cluster them.

    A photo that cannot be read or holds no face is listed in ``skipped`` with why; it never stops the others.
    ``progress(done)`` is called with the number of photos handled so far.
    """
    clustering.check_rule(rule)
    work = [(i, src) for i, src in enumerate(photos)]
    faces: list[tuple[int, str, str, list[float], float]] = []
    vectors: list[np.ndarray] = []
    images: dict[int, dict[str, Any]] = {}
    skipped: list[Skipped] = []
    done = 0
    for chunk in prepared_chunks(pipe, work, FaceChoice.ALL, workers=workers):
        ready = [item for item in chunk if isinstance(item, PreparedFaces)]
        for item in chunk:
            if not isinstance(item, PreparedFaces):
                skipped.append(item.skipped)  # type: ignore[union-attr]
        crops = [crop for item in ready for crop in item.crops]
        if crops:
            vectors.append(pipe.embed_crops(crops, flip=flip))
        for item in ready:
            images[int(item.key)] = dict(item.image)
            name = str(item.image.get("path") or _name(photos[item.key], item.key))
            for face in item.faces:
                faces.append((int(item.key), name, item.sha256, [round(float(c), 1) for c in face.box],
                              round(float(face.score), 4)))
        done += len(chunk)
        if progress is not None:
            progress(done)
    x = np.concatenate(vectors) if vectors else np.zeros((0, pipe.embedder.dim), dtype=np.float32)
    result = clustering.cluster(x, threshold, rule=rule, k=k, min_size=min_size, seed=seed)
    return _report(result, x, faces, images, skipped, len(photos), threshold_source)


def _report(result: clustering.Clustering, x: np.ndarray, faces: list[tuple[int, str, str, list[float], float]],
            images: dict[int, dict[str, Any]], skipped: list[Skipped], photos: int,
            threshold_source: str) -> ClusterReport:
    def face(i: int, cid: int | None, sim: float | None) -> ClusterFace:
        p, name, sha, box, score = faces[i]
        return ClusterFace(photo_index=p, photo=name, image_sha256=sha, box=box, det_score=score, cluster=cid,
                           similarity_to_central=None if sim is None else round(sim, 4))

    clusters: list[Cluster] = []
    order: list[int] = []
    for cid, (members, central) in enumerate(zip(result.members(), result.central)):
        sims = x[members] @ x[int(central)]
        ranked = members[np.lexsort((members, -sims))]  # the central face first, then by similarity to it
        sim_of = dict(zip(members.tolist(), sims.tolist()))
        members_out = [face(int(i), cid, sim_of[int(i)]) for i in ranked]
        clusters.append(Cluster(id=cid, size=len(members), central=members_out[0], faces=members_out))
        order += [int(i) for i in ranked]
    loose = result.unclustered.tolist()
    order += loose
    return ClusterReport(
        clusters=clusters, unclustered=[face(i, None, None) for i in loose], skipped=skipped, photos=photos,
        faces=len(faces), rule=result.rule, threshold=result.threshold, threshold_source=threshold_source,
        k=result.k, min_size=result.min_size, seed=result.seed,
        vectors=x[order] if len(order) else x, images=images)


_NAME = re.compile(r"^cluster-(\d+)$")


def next_cluster_number(store: Store) -> int:
    """1 + the highest N of the people named ``cluster-N`` (1 when none), so new runs never reuse a name."""
    top = 0
    for person in store.people("cluster-"):
        m = _NAME.match(person.name)
        if m:
            top = max(top, int(m.group(1)))
    return top + 1


def enroll_clusters(store: Store, report: ClusterReport, prefix: str = "cluster-") -> list[tuple[str, list[int]]]:
    """Store each cluster of ``report`` as a new person ``cluster-0001``, ``cluster-0002``, ... (numbering goes on
    after the highest existing one), all in one transaction; returns (name, template ids) per cluster.

    A photo becomes an image row of the first cluster that has a face in it, unless it is already enrolled;
    the other faces of that photo are stored without an image row (their box is kept).
    """
    if report.vectors is None or len(report.vectors) < sum(c.size for c in report.clusters):
        raise InvalidInputError("this cluster report holds no vectors to enrol (it was read back from JSON?)")
    out: list[tuple[str, list[int]]] = []
    row = 0
    with store.write():
        number = next_cluster_number(store) if prefix == "cluster-" else 1
        for c in report.clusters:
            name = f"{prefix}{number:04d}"
            number += 1
            ids: list[int] = []
            by_photo: dict[int, list[int]] = {}
            for j, f in enumerate(c.faces):
                by_photo.setdefault(f.photo_index, []).append(row + j)
            for p, rows in by_photo.items():
                image = report.images.get(p)
                if image is not None and store.image_owner(str(image["sha256"])) is not None:
                    image = None
                faces = [c.faces[r - row] for r in rows]
                ids += store.add_templates(name, report.vectors[rows], boxes=[f.box for f in faces],
                                           det_scores=[f.det_score for f in faces], image=image,
                                           create_person=True)
            row += c.size
            out.append((name, ids))
    return out


# ---------------------------------------------------------------------------------- FaceDB's clustering glue
def threshold_for(db: FaceDB, rule: str | None) -> tuple[float, str]:
    """:meth:`facedb.FaceDB.cluster_threshold`: the default clustering threshold (cosine similarity) for ``rule``,
    derived from the database's threshold (:func:`facedb.operations.cluster.default_threshold`), and its source."""
    s = db.settings()
    rule = rule or clustering.DEFAULT_RULE
    value = clustering.default_threshold(s.threshold, rule)
    return value, f"{rule} default from the database's threshold {s.threshold:.4f} ({s.threshold_source})"


def cluster_for(db: FaceDB, photos: Sequence[PhotoSource], *, threshold: float | None, rule: str, k: int,
                min_size: int, seed: int, model: FacePipeline | None, workers: int | None,
                progress: Any) -> ClusterReport:
    """:meth:`facedb.FaceDB.cluster`: group every face in ``photos`` by identity (nobody needs to be enrolled): a
    ClusterReport with the clusters (largest first, each with its central face), the faces left unclustered and
    the photos that gave no face. Faces are embedded as ``db`` embeds (its model and flip setting); ``threshold``
    (cosine similarity) defaults to :func:`threshold_for`; ``rule``, ``k``, ``min_size``, ``seed``: see
    :mod:`facedb.operations.cluster`. Reads nothing from and writes nothing to the gallery;
    :func:`enroll_report` stores the result on request."""
    if threshold is None:
        threshold, source = threshold_for(db, rule)
    else:
        threshold, source = check_threshold(threshold), "given"
    return cluster_photos(db.pipeline(model), photos, flip=db.flip, threshold=threshold,
                          threshold_source=source, rule=rule, k=k, min_size=min_size, seed=seed,
                          workers=workers, progress=progress)


def enroll_report(db: FaceDB, report: ClusterReport, prefix: str) -> list[tuple[str, list[int]]]:
    """:meth:`facedb.FaceDB.enroll_clusters`: :func:`enroll_clusters` on ``db``'s store, the index brought level,
    each new person recorded as ``enroll``. DatabaseError read-only; ModelMismatchError for another model's
    report (nothing stored)."""
    if db.readonly:
        raise DatabaseError(f"{db.root} is open read-only: cannot enrol")
    if report.vectors is not None and len(report.vectors):
        as_unit_rows(report.vectors, db.dim)  # another model's report: ModelMismatchError, nothing stored
    with db._lock:
        created = enroll_clusters(db.store, report, prefix)
        settings = db.settings()
        db.keeper.after_write(settings)
        db.trail.record("enroll", [{"identity": name, "detail": {"templates": len(ids), "from": "cluster"}}
                                   for name, ids in created], settings)
        return created
