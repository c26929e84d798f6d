"""Measuring accuracy through facedb's own pipeline and store.

* :mod:`.metrics`: pure error-rate arithmetic (FAR, TAR, FPIR, DIR, EER, LFW 10-fold accuracy);
* :mod:`.datasets`: LFW pairs / people files and labelled folders, open-set splits;
* :mod:`.cache`: the evaluation embedding cache (safe for concurrent runs);
* :mod:`.embedding`: photos -> one embedding each, through :func:`facedb.faces.pipeline.prepare`;
* :mod:`.protocols`: LFW verification, open-set identification and threshold calibration (CLI targets);
* :mod:`.plots`: ROC and score histograms.
"""

from ..errors import FaceDBError
from .cache import EmbeddingCache, cache_dir
from .datasets import (
    DATA_ENV,
    LFW_NOT_STRANGERS,
    Pair,
    Split,
    data_root,
    identify_split,
    labelled_folder,
    lfw_path,
    read_pairs,
    read_people,
)
from .embedding import Embedded, embed_cached, embed_photos, variant
from .metrics import (
    best_threshold,
    eer,
    fpir_at,
    open_set_metrics,
    resolvable,
    tar_at_far,
    ten_fold_accuracy,
    threshold_at_far,
    verification_report,
)
from .plots import plot_verification
from .protocols import (
    MAX_IMPOSTOR_PAIRS,
    PairScores,
    calibrate_far_folder,
    calibrate_far_pairs,
    calibrate_fpir_folder,
    folder_embeddings,
    folder_pair_scores,
    impostor_pairs,
    open_set_report,
    open_set_scores,
    pair_scores,
    run_identify,
    run_lfw,
    score_pairs,
)

#: The older name of :func:`verification_report`.
lfw_report = verification_report

__all__ = [
    "DATA_ENV", "LFW_NOT_STRANGERS", "MAX_IMPOSTOR_PAIRS", "Embedded", "EmbeddingCache", "FaceDBError", "Pair",
    "PairScores", "Split", "best_threshold", "cache_dir", "calibrate_far_folder", "calibrate_far_pairs",
    "calibrate_fpir_folder", "data_root", "eer", "embed_cached", "embed_photos", "folder_embeddings",
    "folder_pair_scores", "fpir_at", "identify_split", "impostor_pairs", "labelled_folder", "lfw_path", "lfw_report",
    "open_set_metrics", "open_set_report", "open_set_scores", "pair_scores", "plot_verification", "read_pairs",
    "read_people", "resolvable", "run_identify", "run_lfw", "score_pairs", "tar_at_far", "ten_fold_accuracy",
    "threshold_at_far", "variant", "verification_report",
]
