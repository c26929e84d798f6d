"""Embedding evaluation photos through facedb's own pipeline (the same :func:`pipeline.prepare` path that
enrolment uses), with the embedding cache.

Which face a photo stands for: the detected face nearest the image centre (LFW and similar sets centre the
labelled person; other people can appear at the edges). A photo with no detected face is a **failure to
acquire** (ISO/IEC 19795-1): its row is NaN and ``found`` is False; it is never scored as if it were a face.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FaceDBError
from ..faces.pipeline import FaceChoice, FacePipeline, Prepared, source_sha256
from .cache import EmbeddingCache


@dataclass
class Embedded:
    vectors: np.ndarray  # (n, dim), row i for paths[i]; NaN rows for unreadable photos and failures to acquire
    found: np.ndarray  # bool: a face was acquired
    unreadable: list[str]

    @property
    def failures_to_acquire(self) -> int:
        """Readable photos in which no face was found."""
        return int((~self.found).sum()) - len(self.unreadable)


def embed_photos(
    paths: Sequence[Path],
    pipeline: FacePipeline,
    *,
    cache: EmbeddingCache | None = None,
    flip: bool = False,
    progress: Callable[[int], None] | None = None,
    batch: int = 32,
    save_every: int = 512,
) -> Embedded:
    """Embed one face per photo (the central one) through the real pipeline, reusing ``cache``.

    With ``flip``, each embedding is the renormalised mean of the crop's and its mirror image's embedding.
    """
    dim = pipeline.embedder.dim
    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    found = np.zeros(len(paths), dtype=bool)
    unreadable: list[str] = []
    todo: list[tuple[int, Path]] = []
    since_save = 0
    done = 0

    def flush() -> None:
        nonlocal since_save
        if not todo:
            return
        outcomes = pipeline.prepare(todo, FaceChoice.CENTRAL)
        ready = [o for o in outcomes if isinstance(o, Prepared)]
        vecs = pipeline.embed_crops([o.crop for o in ready], flip)
        for o, v in zip(ready, vecs):
            out[o.key], found[o.key] = v, True
            if cache is not None:
                cache.put(o.sha256, v, True)
        for o in outcomes:
            if not isinstance(o, Prepared):
                if o.sha256 is None:  # not even decodable
                    unreadable.append(str(paths[o.key]))
                elif cache is not None:
                    cache.put(o.sha256, np.full(dim, np.nan, dtype=np.float32), False)
        since_save += len(todo)
        todo.clear()
        if cache is not None and since_save >= save_every:
            cache.save()
            since_save = 0

    for i, path in enumerate(paths):
        sha = source_sha256(path) if cache is not None else None
        hit = cache.get(sha) if cache is not None and sha is not None else None
        if hit is not None:
            out[i], found[i] = hit
            done += 1
        else:
            todo.append((i, path))
            if len(todo) >= batch:
                done += len(todo)
                flush()
        if progress is not None:
            progress(done)
    done += len(todo)
    flush()
    if progress is not None:
        progress(done)
    if cache is not None:
        cache.save()
    return Embedded(out, found, unreadable)


def variant(pipeline: FacePipeline, flip: bool) -> str:
    """The cache variant of a pipeline's embeddings: its model id, its detector unless MTCNN (the landmarks, so
    the crops, differ by detector; MTCNN's caches keep their older names), ``-flip`` with flip augmentation."""
    detector = getattr(getattr(pipeline, "settings", None), "detector", "mtcnn")
    return pipeline.model_id + ("" if detector == "mtcnn" else f"-{detector}") + ("-flip" if flip else "")


def embed_cached(paths: Sequence[Path], pipeline: FacePipeline, flip: bool,
                 progress: Callable[[int], None] | None = None, use_cache: bool = True,
                 cipher: Any = None) -> Embedded:
    """:func:`embed_photos` with the evaluation cache of the pipeline's model (a separate one with ``flip``);
    encrypted under ``cipher`` when given (for an encrypted database: ``FaceDB.cache_cipher()``)."""
    cache = EmbeddingCache(variant(pipeline, flip), pipeline.embedder.dim, cipher=cipher) if use_cache else None
    return embed_photos(paths, pipeline, cache=cache, flip=flip, progress=progress)


def require_faces(embedded: Embedded, what: str) -> None:
    """FaceDBError when not a single face was acquired (wrong folder, wrong kind of photo)."""
    if len(embedded.found) and not embedded.found.any():
        raise FaceDBError(f"no face was found in any of the {len(embedded.found)} photos of {what}")
