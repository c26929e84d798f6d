"""Cancellable templates: a keyed orthogonal projection of every template and probe, one per database.

Optional, off by default (``facedb init --cancellable``, ``FaceDB.create(..., cancellable=True)``). Each database
draws a random 256-bit seed at creation; the seed picks a random orthogonal matrix Q (``dim`` x ``dim``, Haar-
distributed: the Q of the QR decomposition of a seeded Gaussian matrix, signs fixed by R's diagonal). Every
vector entering the database (enrolment, ``add_templates``) and every probe (identify, search, verify) is
replaced by Q x before anything else sees it, so the store, the index and the audit trail only ever hold
projected vectors.

Why it keeps accuracy: Q is orthogonal, so (Q a) . (Q b) = a . b: every cosine similarity, hence every score
and decision, is the same as without it (up to float32 rounding, ~1e-7; tests check 1e-6). Why it helps
(ISO/IEC 24745's unlinkability and renewability): the same face enrolled in two databases gives two templates
whose similarity is ~0 (different Q), so stolen templates cannot be matched across databases; and a leaked
database can be re-issued under a new Q without re-enrolling anyone who has their original template.

What it is not: irreversible against someone who holds the seed (Q is invertible). The seed is kept in the
store's settings, so it is as secret as the store: encrypted with it in an encrypted database, readable in a
plain one. Use it together with ``--encrypt``.
"""

from __future__ import annotations

import secrets

import numpy as np

#: The method's name, stored with the seed (a later method gets another name).
METHOD = "keyed-orthogonal-v1"


def new_seed() -> str:
    return secrets.token_hex(32)


def matrix(seed: str, dim: int) -> np.ndarray:
    """The orthogonal ``(dim, dim)`` float64 matrix the hex ``seed`` names."""
    rng = np.random.Generator(np.random.PCG64(int(seed, 16)))
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))  # Haar-distributed, and one matrix per seed


class Projection:
    """Applies a database's projection to ``(n, dim)`` unit rows (float32 in, float32 out)."""

    def __init__(self, seed: str, dim: int) -> None:
        self._q = matrix(seed, dim)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((np.asarray(x, dtype=np.float64) @ self._q.T).astype(np.float32))


def for_seed(seed: str | None, dim: int) -> Projection | bool:
    """The projection of a database whose stored ``projection_seed`` is ``seed``, or False for a database that is
    not cancellable (no seed): what ``FaceDB`` keeps, so that it looks the seed up once."""
    return Projection(seed, dim) if seed else False
