"""The open-set decision rules (facedb/decision.py): the impostor model against the empirical distribution, the
gallery rule against a simulation of strangers facing galleries of growing size, and the rule in the database."""

from __future__ import annotations

import numpy as np
import pytest

from facedb import FaceDB, InvalidInputError
from facedb.decision import ImpostorModel, gallery_threshold, predicted_fpir

from .conftest import unit_rows


@pytest.fixture(scope="module")
def impostors() -> np.ndarray:
    return np.random.default_rng(0).normal(0.8, 0.04, 1_000_000)


def test_impostor_model_reads_the_empirical_tail(impostors):
    model = ImpostorModel.from_scores(impostors, source="synthetic")
    for far in (1e-2, 1e-3, 1e-4, 1e-5):
        t = model.threshold_for_far(far)
        assert np.mean(impostors >= t) <= far * 1.001  # not more than asked
        assert np.mean(impostors >= np.nextafter(t, -1)) > far * 0.5
        assert model.far(t) == pytest.approx(np.mean(impostors >= t), rel=0.05, abs=2e-6)
    for t in (0.86, 0.88, 0.9):  # below the kept table: interpolated between stored quantiles
        assert model.far(t) == pytest.approx(np.mean(impostors >= t), rel=0.3)
    again = ImpostorModel.from_json(model.to_json())
    assert again == model
    with pytest.raises(InvalidInputError):
        ImpostorModel.from_scores(impostors[:50], source="too few")


def test_the_tail_is_extrapolated_beyond_the_data(impostors):
    model = ImpostorModel.from_scores(impostors, source="synthetic")
    t6 = model.threshold_for_far(1e-7)  # 0.1 expected impostors among 1M: beyond the data
    assert t6 > impostors.max()
    assert model.far(t6) == pytest.approx(1e-7, rel=0.01)
    # a Gaussian's true 1e-7 quantile: 0.8 + 5.2 sd; the exponential tail fit is conservative (higher)
    assert t6 >= 0.8 + 5.0 * 0.04


def test_gallery_rule_holds_fpir_as_galleries_grow(impostors):
    """Strangers facing galleries of 1 to 3,000 independent templates: the gallery rule keeps the share accepted
    as someone near the 1% target, while a fixed threshold's share grows with the gallery."""
    rng = np.random.default_rng(1)
    model = ImpostorModel.from_scores(impostors, source="synthetic")
    fixed = model.threshold_for_far(1e-3)
    for m in (1, 30, 300, 3000):
        best = rng.normal(0.8, 0.04, (20000, m)).max(1)  # each stranger's best score over m templates
        t = gallery_threshold(model, 0.01, m)
        # at most the target, and not far below it (the table's discreteness errs on the safe side: at 3,000
        # templates the per-comparison FAR needed is 3.4e-6, i.e. 3.4 of the million impostor scores)
        assert 0.004 <= np.mean(best >= t) <= 0.0125
        assert 0.005 <= predicted_fpir(model, t, m) <= 0.0101
        assert predicted_fpir(model, fixed, m) == pytest.approx(np.mean(best >= fixed), abs=0.02)
    assert predicted_fpir(model, fixed, 3000) > 0.9  # what a 1:1 threshold does to a large gallery


def test_databases_use_the_rule_they_were_made_with(tmp_path, impostors, rng):
    model = ImpostorModel.from_scores(impostors, source="synthetic")
    with FaceDB.create(tmp_path / "g", model_id="m", dim=16, threshold=0.5, impostors=model) as db:
        db.add_templates_many([(f"p{i}", unit_rows(rng, 1, 16)) for i in range(50)])
        answer = db.identify(unit_rows(rng, 1, 16)[0])
        assert answer.threshold == pytest.approx(max(0.5, gallery_threshold(model, 0.01, 50)))
        assert answer.rule.startswith("gallery") and db.stats().decision_rule == "gallery"
        assert db.identify(unit_rows(rng, 1, 16)[0], threshold=0.3).rule == "given"
        db.set_rule("fixed")
        fixed = db.identify(unit_rows(rng, 1, 16)[0])
        assert (fixed.threshold, fixed.rule) == (0.5, "fixed")
        assert "strangers" in db.calibration_warning()  # a fixed 0.5 lets nearly every stranger in
        db.set_rule("gallery", target=0.001)
        assert db.identify(unit_rows(rng, 1, 16)[0]).threshold == pytest.approx(gallery_threshold(model, 0.001, 50))
        assert db.calibration_warning() is None
    with FaceDB.create(tmp_path / "f", model_id="m", dim=16, threshold=0.5) as db:
        assert db.stats().decision_rule == "fixed"
        with pytest.raises(InvalidInputError, match="impostor model"):
            db.set_rule("gallery")
        assert db.stats().decision_rule == "fixed"
