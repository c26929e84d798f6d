"""The open-set decision rules (facedb/gallery/decision.py): the impostor model against the empirical distribution, the
gallery rule against a simulation of strangers facing galleries of growing size, and the rule in the database."""

from __future__ import annotations

import numpy as np
import pytest

from facedb import FaceDB, InvalidInputError
from facedb.gallery.decision import ImpostorModel, gallery_threshold, predicted_fpir

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


def test_the_margin_rule_decides_on_the_lead_over_the_runner_up(tmp_path):
    """accept iff s1 >= the 1:1 threshold and s1 - 0.5 s2 >= the margin threshold; one person: s1 alone."""
    x = np.eye(4, dtype=np.float32)
    with FaceDB.create(tmp_path / "m", model_id="m", dim=4, threshold=0.6, margin=0.35) as db:
        assert db.settings().rule.kind == "margin"
        db.add_templates("a", x[0], create=True)
        alone = db.identify(np.array([0.8, 0.6, 0, 0], dtype=np.float32), k=1)  # s1 0.8, nobody else enrolled
        assert alone.identity == "a" and alone.score is None
        db.add_templates("b", x[1], create=True)
        close = db.identify(np.array([0.8, 0.6, 0, 0], dtype=np.float32), k=1)  # s1 0.8, s2 0.6: 0.5 >= 0.35
        assert close.identity == "a" and close.score == pytest.approx(0.5) and len(close.candidates) == 1
        near = np.array([0.65, 0.64, np.sqrt(1 - 0.65**2 - 0.64**2), 0.0], dtype=np.float32)
        tied = db.identify(near, k=3)  # s1 0.65, s2 0.64: 0.33 < 0.35
        assert tied.identity is None and tied.score < 0.35 <= tied.similarity  # above the floor, no lead
        assert tied.score_threshold == 0.35 and tied.rule.startswith("margin")
        low = db.identify(np.array([0.55, 0.0, 0.835, 0.0], dtype=np.float32) / np.hypot(0.55, 0.835))
        assert low.identity is None and low.similarity < 0.6  # below the floor, whatever its lead
        db.set_rule("fixed")
        assert db.identify(near).identity == "a"
        with pytest.raises(InvalidInputError):
            db.set_rule("margin", margin=2.0)
    with FaceDB.create(tmp_path / "n", model_id="m", dim=4, threshold=0.6) as db, \
            pytest.raises(InvalidInputError, match="margin threshold"):
        db.set_rule("margin")


def test_calibrating_fpir_under_the_margin_rule_sets_the_margin_threshold(tmp_path, monkeypatch, fake_pipeline):
    import facedb.faces.pipeline

    from .test_field import cli, jlines, labelled

    monkeypatch.setattr(facedb.faces.pipeline, "get_pipeline", lambda *a, **k: fake_pipeline)
    monkeypatch.setenv("FACEDB_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "db"
    with FaceDB.create(db, model_id=fake_pipeline.model_id, dim=fake_pipeline.embedder.dim, threshold=0.5,
                       margin=0.9):
        pass
    folder = labelled(tmp_path / "calib", 12, 3)
    rec = jlines(cli(db, "--json", "calibrate", "--fpir", "0.1", "--folder", folder, "--gallery-size", 3))[0]
    assert rec["margin_floor"] == 0.5 and "margin_threshold" in rec
    # the output says what was stored: the margin, not the fixed-rule threshold it also prints
    assert rec["applied"].startswith(f"margin rule: s1 - 0.5 s2 >= {rec['margin_threshold']:.4f}, with s1 >= 0.5000")
    with FaceDB.open(db) as d:
        s = d.settings()
        assert s.rule.kind == "margin" and s.rule.margin == pytest.approx(rec["margin_threshold"])
        assert s.threshold == 0.5 and s.calibration.details["margin_threshold"] == rec["margin_threshold"]


def test_mean_templates_follow_every_change_and_are_matched(tmp_path, rng):
    """A person's mean template (on by setting) is the renormalised mean of their templates, kept through
    enrolment, removal of a template, merge and the setting switched; counts leave it out; check verifies it."""
    def mean_of(vs):
        m = np.mean(vs, axis=0)
        return m / np.linalg.norm(m)

    def stored(db, name):
        derived = [t for t in db.templates(name, include_derived=True) if t.derived]
        return derived[0].vector if derived else None

    with FaceDB.create(tmp_path / "db", model_id="m", dim=16, threshold=0.5, mean_templates=True) as db:
        a = unit_rows(rng, 3, 16)
        ids = db.add_templates("ann", a[:1], create=True)
        assert stored(db, "ann") is None  # one template: no mean
        ids += db.add_templates("ann", a[1:])
        assert np.allclose(stored(db, "ann"), mean_of(a), atol=1e-6)
        assert db.person("ann").templates == 3 and db.stats().templates == 3 and db.stats().mean_templates == 1
        assert len(list(db.templates("ann"))) == 3 and len(list(db.templates("ann", include_derived=True))) == 4
        probe = mean_of(a)  # the mean itself: found as a perfect match through the index
        assert db.identify(probe, k=1).similarity == pytest.approx(1.0, abs=1e-5)
        db.remove_template(ids[0])
        assert np.allclose(stored(db, "ann"), mean_of(a[1:]), atol=1e-6)
        mean_id = next(t.id for t in db.templates("ann", include_derived=True) if t.derived)
        with pytest.raises(InvalidInputError, match="mean template"):
            db.remove_template(mean_id)
        b = unit_rows(rng, 2, 16)
        db.add_templates("bob", b, create=True)
        db.merge_people("bob", "ann")
        assert np.allclose(stored(db, "ann"), mean_of(np.concatenate([a[1:], b])), atol=1e-6)
        assert db.check().ok and db.stats().mean_templates == 1
        db.configure_templates(mean=False)
        assert stored(db, "ann") is None and db.check().ok and db.index_state().live == 4
        db.configure_templates(mean=True)
        assert stored(db, "ann") is not None and db.index_state().live == 5
        wrong = unit_rows(rng, 1, 16)[0].tobytes()
        db.store.conn.execute("UPDATE embeddings SET vector = ? WHERE derived = 1", (wrong,))
        assert not db.check().ok  # a mean that no longer matches is reported


def test_verify_compares_with_photo_templates_only(tmp_path):
    """The 1:1 threshold is calibrated photo against photo; a mean template is nearer to everyone, so verify
    leaves it out (found by the newcomer check: a stranger was accepted through the mean alone)."""
    e = np.eye(16, dtype=np.float32)
    mean = (e[0] + e[1]) / np.sqrt(2)
    with FaceDB.create(tmp_path / "db", model_id="m", dim=16, threshold=0.9, mean_templates=True) as db:
        db.add_templates("ann", e[:2], create=True)
        assert db.stats().mean_templates == 1
        result = db.verify(mean, "ann")  # 0.707 to each photo, 1.0 to the mean
        assert result.accepted is False and result.similarity == pytest.approx(np.sqrt(0.5), abs=1e-5)
        assert db.verify(e[0], "ann").accepted is True
        assert db.identify(mean, k=1).identity == "ann"  # 1:N still searches the mean (its FPIR is measured)
