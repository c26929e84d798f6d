"""scripts/stranger_rate.py's protocol (issue #24's ORL and Yale stranger target): every person a stranger against
one photo of each of the others, and the same with every choice of the enrolled photo. Synthetic unit vectors,
so the counts are known exactly; the figures themselves come from the script's run on the real photos."""

from __future__ import annotations

import importlib.util

import numpy as np

from facedb.gallery.decision import Policy

from .conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("stranger_rate_script", REPO / "scripts" / "stranger_rate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _people(lookalike_first: bool) -> tuple[np.ndarray, list[str]]:
    """Four people on four orthogonal axes, three photos each; ``b``'s photos lean towards ``a``'s axis (cosine
    0.6 with ``a``'s photos), except the first photo of ``b`` when ``lookalike_first`` is False."""
    rows, labels = [], []
    for k, name in enumerate("abcd"):
        for j in range(3):
            v = np.zeros(8)
            v[k] = 1.0
            v[4 + j % 4] = 0.05 * (j + 1)  # photos of one person differ a little
            if name == "b" and (j > 0 or lookalike_first):
                v = np.zeros(8)
                v[0], v[1] = 0.6, 0.8
            rows.append(v / np.linalg.norm(v))
            labels.append(name)
    return np.array(rows, dtype=np.float32), labels


def test_a_lookalike_pair_lets_strangers_in_both_ways_and_each_enrolled_photo_is_counted():
    script = _script()
    X, labels = _people(lookalike_first=False)
    fixed = lambda n: Policy("fixed", 0.5)  # noqa: E731
    first = script.stranger_rate(X, labels, fixed)
    # enrolled: a0, b0 (not a look-alike), c0, d0. Stranger a: a's photos vs b0 (cosine 0) -> none in.
    # Stranger b: b1 and b2 (cosine 0.6 with a0, which leans 0.05 off axis: 0.598) -> 2 in, b0 not.
    assert (first["let_in"], first["probes"], first["worst_person"]) == (2, 12, "b")
    assert first["let_in_by_stranger"] == {"b": 2}
    choices = script.enrolled_photo_choices(X, labels, fixed)
    # k = 1 and 2 enrol b1 / b2, who look like a: a's 3 photos get in as b, and b's b1, b2 as a
    assert choices["choices"] == 3
    assert [round(f * 12) for f in choices["fpir"]] == [2, 5, 5]
    assert choices["let_in_by_stranger"] == {"b": 6, "a": 6}
    assert choices["max_fpir"] == 5 / 12 and choices["min_fpir"] == 2 / 12
    assert abs(choices["mean_fpir"] - 12 / 36) < 1e-12


def test_the_json_records_the_protocol_not_the_usage_line():
    """The JSON's ``protocol`` field carried the docstring's usage line (``python scripts/...``) before."""
    script = _script()
    assert script.PROTOCOL.startswith("Every person in turn is the stranger")
    assert "python scripts" not in script.PROTOCOL
