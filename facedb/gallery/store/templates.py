"""The ``embeddings`` and ``images`` tables: every template (a unit vector, little-endian float32) with the photo
it came from, each person's mean template when kept, the bulk reads the index and the query engine need
(snapshots, streams, re-scoring vectors), the move to another model, and the store's own integrity check.

Its own family because the query path and the index upkeep read templates in bulk and in hot loops: plain SQL
and raw blobs, not dicts. ``AUTOINCREMENT`` ids: a template id is never reused, so a stale index can never point
at someone else.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ...errors import DatabaseError, InvalidInputError, ModelChangedError, PersonNotFoundError, TemplateNotFoundError
from ...records import Template
from ..scores import UNIT_TOLERANCE, from_blob, to_blob
from .connection import StoreBase
from .migrations import THUMBNAILS_VERSION
from .times import utcnow


class TemplateRows(StoreBase):
    """The templates and photos of a :class:`~facedb.gallery.store.Store`."""

    @property
    def _has_derived(self) -> bool:
        return self.version >= 9

    def _refresh_mean(self, pid: int) -> tuple[list[int], list[int]]:
        """Inside a write: replace the person's mean template (derived) by the renormalised mean of their other
        templates, when the ``mean_templates`` setting is on and they have at least two; returns (ids added,
        ids removed) for the change log."""
        if not self._has_derived:
            return [], []
        removed = [r[0] for r in self.conn.execute(
            "SELECT id FROM embeddings WHERE person_id = ? AND derived = 1", (pid,))]
        if removed:
            self.conn.execute("DELETE FROM embeddings WHERE person_id = ? AND derived = 1", (pid,))
        added: list[int] = []
        if self.get_meta("mean_templates") == "1":
            _, own = self.person_vectors([pid], photos_only=True)
            if len(own) >= 2:
                mean = own.mean(axis=0)
                norm = float(np.linalg.norm(mean))
                if norm > 1e-6:  # templates that cancel out have no mean direction
                    cur = self.conn.execute(
                        "INSERT INTO embeddings (person_id, image_id, box, det_score, vector, created_at, derived) "
                        "VALUES (?, NULL, NULL, NULL, ?, ?, 1)", (pid, to_blob(mean / norm), utcnow()))
                    added.append(int(cur.lastrowid))
        return added, removed

    def refresh_means(self) -> int:
        """Recompute every person's mean template (after the setting changed), in one transaction; returns how
        many people have one now."""
        with self.write():
            added_all: list[int] = []
            removed_all: list[int] = []
            for (pid,) in self.conn.execute("SELECT id FROM people").fetchall():
                added, removed = self._refresh_mean(pid)
                added_all += added
                removed_all += removed
            if added_all or removed_all:
                self._bump_generation(added_all, removed_all)
        return len(added_all)

    def add_templates(
        self,
        name: str,
        vectors: np.ndarray,
        *,
        boxes: Sequence[Sequence[float] | None] | None = None,
        det_scores: Sequence[float | None] | None = None,
        image: dict[str, Any] | None = None,
        create_person: bool = False,
        metadata: dict[str, Any] | None = None,
        external_id: str | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        model_id: str | None = None,
    ) -> list[int]:
        """Store unit ``vectors`` (n, dim) for ``name``, with the image they came from, in one transaction.

        With ``create_person`` the person is created if missing (enrolment). ``image`` is a dict with sha256,
        path, size, width, height; the same sha256 cannot be stored twice. ``metadata`` is merged into the
        person's; ``external_id`` (if given) becomes theirs (DuplicatePersonError if another person has it).
        ``thumbnails``: a JPEG (or None) per vector, kept with its template (see :mod:`facedb.gallery.thumbnails`).
        ``model_id``: the model that made the vectors, checked in the transaction (ModelChangedError when the
        database was moved to another model meanwhile: facedb/operations/reembed.py).
        """
        n = len(vectors)
        boxes = list(boxes) if boxes is not None else [None] * n
        det_scores = list(det_scores) if det_scores is not None else [None] * n
        thumbs = list(thumbnails) if thumbnails is not None else [None] * n
        if len(boxes) != n or len(det_scores) != n or len(thumbs) != n:
            raise InvalidInputError("boxes, det_scores and thumbnails must have one entry per vector")
        now = utcnow()
        with self.write():
            if model_id is not None and self.get_meta("model_id") != model_id:
                raise ModelChangedError(f"the database was moved to {self.get_meta('model_id')!r} while these "
                                        f"photos were embedded by {model_id!r}: enrol them again")
            try:
                pid = self._person_id(name)
                if metadata or external_id is not None:
                    self.update_person(name, metadata=metadata or None, external_id=external_id)
            except PersonNotFoundError:
                if not create_person:
                    raise
                pid = self._insert_person(name, external_id, metadata)
            image_id = None
            if image is not None:
                owner = self.image_owner(image["sha256"])
                if owner is not None:
                    raise InvalidInputError(f"already enrolled (as {owner!r})")
                image_id = self.db["images"].insert({**image, "person_id": pid, "created_at": now}).last_pk
            sql = (
                "INSERT INTO embeddings (person_id, image_id, box, det_score, vector, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)"
            )
            ids = []
            for vec, box, score in zip(vectors, boxes, det_scores):
                cur = self.conn.execute(sql, (
                    pid,
                    image_id,
                    json.dumps([round(float(c), 2) for c in box]) if box is not None else None,
                    float(score) if score is not None else None,
                    to_blob(vec),
                    now,
                ))
                ids.append(int(cur.lastrowid))  # AUTOINCREMENT: never a reused id
            self._insert_thumbnails(self.conn, "embedding_id", ids, thumbs)
            self.conn.execute("UPDATE people SET updated_at = ? WHERE id = ?", (now, pid))
            added, removed = self._refresh_mean(pid)
            self._bump_generation(ids + added, removed)
        return ids

    def replace_all_templates(self, vectors: dict[int, np.ndarray], thumbnails: dict[int, bytes | None],
                              drop: Sequence[int], meta: dict[str, str], unset: Sequence[str]) -> dict[str, int]:
        """Put the whole gallery under another model in one transaction (facedb/operations/reembed.py): every photo
        template gets its new vector (``vectors``: template id -> unit vector of the new ``meta["dim"]``) or is dropped
        (``drop``, with its photo's row once it has no template left); thumbnails in ``thumbnails`` replace the
        template's (None: it keeps none); the unknown visitors' faces (the old model's vectors) are forgotten;
        ``meta`` rows are written and ``unset`` keys deleted; mean templates are recomputed; the change log is
        cut at the new generation, so every process rebuilds its index from the store instead of replaying it.
        InvalidInputError (nothing changed) when the photo templates are not exactly those given. Returns
        {"templates", "dropped", "visitors_forgotten", "mean_templates"}."""
        dim = int(meta["dim"])
        old_dim = self.dim
        with self.write():
            own = " WHERE derived = 0" if self._has_derived else ""
            held = {int(r[0]) for r in self.conn.execute(f"SELECT id FROM embeddings{own}")}
            given = set(vectors) | {int(i) for i in drop}
            if held != given:
                raise InvalidInputError(f"the gallery changed while it was re-embedded ({len(held - given)} templates "
                                        f"added, {len(given - held)} removed): nothing was changed; run it again")
            try:
                images = [r[0] for r in self._rows_in("SELECT DISTINCT image_id FROM embeddings WHERE id IN "
                                                      "({marks}) AND image_id IS NOT NULL", [int(i) for i in drop])]
                list(self._rows_in("DELETE FROM embeddings WHERE id IN ({marks})", [int(i) for i in drop]))
                list(self._rows_in("DELETE FROM images WHERE id IN ({marks}) AND NOT EXISTS (SELECT 1 FROM "
                                   "embeddings e WHERE e.image_id = images.id)", images))
                self.dim = dim  # what the rows read back from here on are
                self.conn.executemany("UPDATE embeddings SET vector = ? WHERE id = ?",
                                      [(to_blob(v), int(i)) for i, v in vectors.items()])
                if self.version >= THUMBNAILS_VERSION:
                    ids = [int(i) for i in thumbnails]
                    list(self._rows_in("DELETE FROM thumbnails WHERE embedding_id IN ({marks})", ids))
                    self._insert_thumbnails(self.conn, "embedding_id", ids, [thumbnails[i] for i in ids])
                forgotten = 0
                if self._has_unassigned():
                    forgotten = self.conn.execute("DELETE FROM unassigned_faces").rowcount
                self.db["meta"].upsert_all([{"key": k, "value": str(v)} for k, v in meta.items()], pk="key")
                list(self._rows_in("DELETE FROM meta WHERE key IN ({marks})", list(unset)))
                means = 0
                for (pid,) in self.conn.execute("SELECT id FROM people").fetchall():
                    means += len(self._refresh_mean(pid)[0])
                gen = str(self.generation() + 1)
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (gen,))
                self.conn.execute("DELETE FROM changes")
                self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('changes_floor', ?)", (gen,))
                self._bump("settings_version")
                self._bump("people_version")
            except BaseException:
                self.dim = old_dim
                raise
        return {"templates": len(vectors), "dropped": len(drop), "visitors_forgotten": forgotten,
                "mean_templates": means}

    def remove_template(self, template_id: int) -> str:
        """Delete one template (and its photo's row once the photo has no template left); returns the name of
        the person it belonged to (who stays enrolled, possibly with no templates)."""
        with self.write():
            derived = "e.derived" if self._has_derived else "0"
            row = self.conn.execute(
                f"SELECT e.image_id, p.name, e.person_id, {derived} FROM embeddings e JOIN people p "
                "ON p.id = e.person_id WHERE e.id = ?", (int(template_id),)).fetchone()
            if row is None:
                raise TemplateNotFoundError(f"no template with id {template_id}")
            image_id, name, pid, is_derived = row
            if is_derived:
                raise InvalidInputError(f"template {template_id} is {name!r}'s mean template, derived from their "
                                        "photos: remove a photo's template and the mean follows")
            self.conn.execute("DELETE FROM embeddings WHERE id = ?", (int(template_id),))
            if image_id is not None and not self.conn.execute(
                    "SELECT 1 FROM embeddings WHERE image_id = ?", (image_id,)).fetchone():
                self.conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
            self.conn.execute("UPDATE people SET updated_at = ? WHERE name = ?", (utcnow(), name))
            added, removed = self._refresh_mean(pid)
            self._bump_generation(added, [int(template_id), *removed])
        return str(name)

    def image_owner(self, sha256: str) -> str | None:
        row = self.conn.execute(
            "SELECT p.name FROM images i JOIN people p ON p.id = i.person_id WHERE i.sha256 = ?", (sha256,)
        ).fetchone()
        return row[0] if row else None

    def _vectors(self, blobs: Sequence[bytes]) -> np.ndarray:
        if not blobs:
            return np.zeros((0, self.dim), dtype=np.float32)
        raw = b"".join(blobs)
        if len(raw) != 4 * self.dim * len(blobs):
            bad = sum(1 for b in blobs if len(b) != 4 * self.dim)
            raise DatabaseError(f"{self.path}: {bad} stored template(s) are not {self.dim} float32 values: the "
                                "database is damaged (`facedb check` lists what)")
        return np.frombuffer(raw, dtype="<f4").reshape(len(blobs), self.dim).astype(np.float32)

    def snapshot(self, batch: int = 65536) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(generation, template ids, person ids, vectors) of every template, from one consistent snapshot."""
        with self.read():
            gen = self.generation()
            ids: list[np.ndarray] = []
            pids: list[np.ndarray] = []
            vecs: list[np.ndarray] = []
            cursor = self.conn.execute("SELECT id, person_id, vector FROM embeddings ORDER BY id")
            while rows := cursor.fetchmany(batch):
                ids.append(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
                pids.append(np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows)))
                vecs.append(self._vectors([r[2] for r in rows]))
        if not ids:
            empty = np.zeros(0, dtype=np.int64)
            return gen, empty, empty.copy(), np.zeros((0, self.dim), dtype=np.float32)
        return gen, np.concatenate(ids), np.concatenate(pids), np.concatenate(vecs)

    def stream_templates(self, batch: int = 16384) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Every template as (generation, ids, person ids, vectors ``(rows, dim)`` float32) batches of ``batch``
        rows in id order, all from one snapshot (the generation is the same in every batch), read through a
        connection of its own: another thread may consume it while this store's connection answers queries,
        and no more than one batch is held in memory (a 10M-template gallery is 20 GB of vectors)."""
        conn = self._connect(self.path, readonly=True, key=self._key)
        try:
            conn.execute("BEGIN")  # one snapshot for every batch
            row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            gen = int(row[0]) if row else 0
            cursor = conn.execute("SELECT id, person_id, vector FROM embeddings ORDER BY id")
            while rows := cursor.fetchmany(batch):
                yield (gen, np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
                       np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows)),
                       self._vectors([r[2] for r in rows]))
        finally:
            conn.close()

    def template_map(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(generation, template ids, person ids) of every template, sorted by id, from one snapshot."""
        with self.read():
            gen = self.generation()
            # From the (person_id, rowid) index alone: scanning the table would read every 2 KiB vector blob.
            # Read in batches into arrays: 10M rows as one list of tuples would take over a gigabyte.
            cursor = self.conn.execute("SELECT id, person_id FROM embeddings INDEXED BY embeddings_person")
            parts = []
            while rows := cursor.fetchmany(65536):
                parts.append(np.array(rows, dtype=np.int64).reshape(-1, 2))
        arr = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
        order = np.argsort(arr[:, 0], kind="stable")
        return gen, arr[order, 0], arr[order, 1]

    def templates(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, person ids, vectors) of the templates among ``ids`` that still exist, in id order."""
        rows = sorted(self._rows_in("SELECT id, person_id, vector FROM embeddings WHERE id IN ({marks})",
                                    [int(i) for i in ids]))
        return (np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64),
                self._vectors([r[2] for r in rows]))

    def person_vectors(self, person_ids: Sequence[int], photos_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector of the given people, grouped by person: (person id of each row, sorted; vectors
        ``(m, dim)``); ``photos_only``: without their mean templates. One query and one buffer per 900 people,
        since the query engine calls this per probe."""
        own = " AND derived = 0" if photos_only and self._has_derived else ""
        rows = list(self._rows_in(
            f"SELECT person_id, vector FROM embeddings WHERE person_id IN ({{marks}}){own} ORDER BY person_id",
            sorted({int(p) for p in person_ids})))
        return np.array([r[0] for r in rows], dtype=np.int64), self._vectors([r[1] for r in rows])

    def iter_templates(self, person: str | None = None, batch: int = 4096,
                       include_derived: bool = False) -> Iterator[Template]:
        """Every stored template (of ``person`` only, if given), in id order, with its person and photo; read in
        batches of ``batch`` rows, each batch a consistent snapshot. Mean templates (derived from a person's
        others) only with ``include_derived``."""
        clauses, params = [], []
        if person is not None:
            clauses.append("e.person_id = ?")
            params.append(self._person_id(person))
        if self._has_derived and not include_derived:
            clauses.append("e.derived = 0")
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        last = 0
        while True:
            derived = "e.derived" if self._has_derived else "0"
            rows = self.conn.execute(
                f"SELECT e.id, p.name, e.person_id, e.vector, i.sha256, e.box, e.det_score, e.created_at, {derived} "
                f"FROM embeddings e JOIN people p ON p.id = e.person_id LEFT JOIN images i ON i.id = e.image_id "
                f"{where} {'AND' if where else 'WHERE'} e.id > ? ORDER BY e.id LIMIT ?",
                [*params, last, batch]).fetchall()
            if not rows:
                return
            for r in rows:
                yield Template(id=r[0], person=r[1], person_id=r[2], vector=from_blob(r[3], self.dim),
                               image_sha256=r[4], box=json.loads(r[5]) if r[5] else None, det_score=r[6],
                               created_at=r[7], derived=bool(r[8]))
            last = rows[-1][0]

    # ------------------------------------------------------------------- stats
    def counts(self) -> dict[str, int]:
        one = self.conn.execute
        return {
            "people": one("SELECT COUNT(*) FROM people").fetchone()[0],
            "images": one("SELECT COUNT(*) FROM images").fetchone()[0],
            "templates": one("SELECT COUNT(*) FROM embeddings" + (" WHERE derived = 0" if self._has_derived else "")
                             ).fetchone()[0],
            "mean_templates": one("SELECT COUNT(*) FROM embeddings WHERE derived = 1").fetchone()[0]
            if self._has_derived else 0,
        }

    def people_with_templates(self, at_most: int) -> int:
        """How many people have between 1 and ``at_most`` templates (enrolment advice: one is fragile)."""
        own = " WHERE derived = 0" if self._has_derived else ""
        return int(self.conn.execute(
            f"SELECT COUNT(*) FROM (SELECT person_id FROM embeddings{own} GROUP BY person_id HAVING COUNT(*) <= ?)",
            (int(at_most),)).fetchone()[0])

    def check(self) -> tuple[list[str], list[str]]:
        """(checks run, problems found) on the store alone."""
        checks: list[str] = []
        problems: list[str] = []
        integrity = [r[0] for r in self.conn.execute("PRAGMA integrity_check").fetchall()]
        checks.append("SQLite integrity_check")
        if integrity != ["ok"]:
            problems.extend(f"sqlite: {msg}" for msg in integrity[:10])
        fk = self.conn.execute("PRAGMA foreign_key_check").fetchall()
        checks.append("foreign keys")
        if fk:
            problems.append(f"{len(fk)} rows violate foreign keys")
        meta = self.all_meta()
        checks.append("identity settings (model_id, dim, threshold, generation)")
        for key in ("model_id", "dim", "threshold", "generation"):
            if key not in meta:
                problems.append(f"meta key {key!r} is missing")
        checks.append(f"every template is {self.dim} finite float32 values of unit length")
        bad_size = bad_norm = 0
        for (blob,) in self.conn.execute("SELECT vector FROM embeddings"):
            if len(blob) != 4 * self.dim:
                bad_size += 1
                continue
            v = from_blob(blob, self.dim)
            if not np.isfinite(v).all() or abs(float(np.linalg.norm(v)) - 1.0) > UNIT_TOLERANCE:
                bad_norm += 1
        if bad_size:
            problems.append(f"{bad_size} templates have the wrong size")
        if bad_norm:
            problems.append(f"{bad_norm} templates are not finite unit vectors")
        checks.append("every image has its templates, and each template's image belongs to the same person")
        orphans = self.conn.execute(
            "SELECT COUNT(*) FROM images i WHERE NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.image_id = i.id)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} images have no templates (half-enrolled photos)")
        crossed = self.conn.execute(
            "SELECT COUNT(*) FROM embeddings e JOIN images i ON i.id = e.image_id WHERE i.person_id != e.person_id"
        ).fetchone()[0]
        if crossed:
            problems.append(f"{crossed} templates belong to a person other than their image's")
        checks.append("no two people's names are the same text in another Unicode form (NFC)")
        seen: dict[str, str] = {}
        for (name,) in self.conn.execute("SELECT name FROM people"):
            nfc = unicodedata.normalize("NFC", name)
            if nfc in seen:
                problems.append(f"two people are named {nfc!r} in different Unicode forms: merge them "
                                f"(`facedb merge`)")
            seen[nfc] = name
        if self._has_derived:
            checks.append("every mean template is the mean of its person's other templates (when kept)")
            on = self.get_meta("mean_templates") == "1"
            wrong = 0
            for (pid,) in self.conn.execute("SELECT id FROM people").fetchall():
                own = [r[0] for r in self.conn.execute(
                    "SELECT vector FROM embeddings WHERE person_id = ? AND derived = 0", (pid,))]
                kept = [r[0] for r in self.conn.execute(
                    "SELECT vector FROM embeddings WHERE person_id = ? AND derived = 1", (pid,))]
                if not on or len(own) < 2:
                    wrong += len(kept) > 0
                    continue
                if len(kept) != 1 or any(len(b) != 4 * self.dim for b in own + kept):
                    wrong += 1
                    continue
                mean = self._vectors(own).mean(axis=0)
                if float(np.linalg.norm(mean)) > 1e-6 and not np.allclose(
                        self._vectors(kept)[0], mean / np.linalg.norm(mean), atol=1e-5):
                    wrong += 1
            if wrong:
                problems.append(f"{wrong} people's mean templates do not match their templates "
                                "(`facedb mean-templates on` or `FaceDB.configure_templates(mean=True)` "
                                "recomputes them)")
        return checks, problems

