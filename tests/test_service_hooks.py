"""Door events: webhooks delivered to a receiver on 127.0.0.1, signed, retried, folded, never in the way of a
decision; and the dispatcher's retry and folding rules with a recording sender."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import warnings

import numpy as np
import pytest

from facedb import FaceDB
from facedb.operations.hooks import Dispatcher, Webhook, check_events, sign, verify_signature

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from facedb.service.app import create_app
from facedb.service.config import ServiceSettings

from .servicekit import BLUE, RED, Receiver, make_db, png, wait_ready

E0 = np.eye(32)[0].tolist()


def hook(url="http://127.0.0.1:9/x", events=("identify.match",), key_id=None, hook_id=1):
    return Webhook(id=hook_id, url=url, events=list(events), key_id=key_id, created_at="now", secret="s" * 20)


class Recorder:
    """A sender that records (time, url, body, headers) and answers with the statuses in ``script``."""

    def __init__(self, script=None):
        self.script = list(script or [])
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, url, body, headers):
        with self.lock:
            self.calls.append((time.monotonic(), url, json.loads(body), headers))
            status = self.script.pop(0) if self.script else 200
        if isinstance(status, Exception):
            raise status
        return status


# ------------------------------------------------------------------------------------------- signatures
def test_signature_is_hmac_sha256_of_timestamp_and_body():
    body = b'{"event":"identify.match"}'
    sig = sign("topsecret", 1700000000, body)
    expected = hmac.new(b"topsecret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sig == f"sha256={expected}"
    assert verify_signature("topsecret", "1700000000", body, sig, now=1700000100)
    assert not verify_signature("topsecret", "1700000000", body + b" ", sig, now=1700000100)  # tampered
    assert not verify_signature("other", "1700000000", body, sig, now=1700000100)
    assert not verify_signature("topsecret", "1700000000", body, sig, now=1700000000 + 301)  # replayed late
    assert not verify_signature("topsecret", "soon", body, sig)


def test_event_names_are_checked():
    assert check_events("identify.unknown, verify.reject") == ["identify.unknown", "verify.reject"]
    assert len(check_events("*")) == 6
    from facedb import InvalidInputError

    for bad in ("", "door.open", ["identify.match", "x"]):
        with pytest.raises(InvalidInputError):
            check_events(bad)


# ------------------------------------------------------------------------------------------- dispatcher
def test_retries_with_backoff_until_delivered_and_gives_up_after_max_attempts():
    rec = Recorder([500, 0, ConnectionError("refused"), 200])
    d = Dispatcher(lambda: [hook()], rec, fold_window=0, backoff=0.05, max_attempts=6)
    d.publish("identify.match", {"identity": "Ann"}, key_id="k", subject="Ann")
    assert d.wait_idle(10)
    assert len(rec.calls) == 4 and d.stats.delivered == 1 and d.stats.retried == 3
    gaps = [b[0] - a[0] for a, b in zip(rec.calls, rec.calls[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2  # doubling
    assert len({c[3]["X-FaceDB-Delivery"] for c in rec.calls}) == 1  # one delivery id across retries
    d.close()

    rec = Recorder([503] * 10)
    d = Dispatcher(lambda: [hook()], rec, fold_window=0, backoff=0.01, max_attempts=3)
    d.publish("identify.match", {}, key_id=None, subject="Ann")
    assert d.wait_idle(10)
    assert len(rec.calls) == 3 and d.stats.failed == 1 and d.stats.delivered == 0
    d.close()

    rec = Recorder([404])
    d = Dispatcher(lambda: [hook()], rec, fold_window=0, backoff=0.01)
    d.publish("identify.match", {}, key_id=None, subject="Ann")
    assert d.wait_idle(10)
    assert len(rec.calls) == 1 and d.stats.failed == 1  # a 4xx is final
    d.close()


def test_folding_sends_the_first_at_once_and_one_summary_per_window():
    rec = Recorder()
    d = Dispatcher(lambda: [hook(events=("identify.match", "identify.unknown"))], rec, fold_window=0.4)
    for _ in range(5):
        d.publish("identify.match", {"identity": "Ann"}, key_id="k1", subject="Ann")
    d.publish("identify.match", {"identity": "Bob"}, key_id="k1", subject="Bob")
    d.publish("identify.unknown", {}, key_id="k1", subject=None)
    d.publish("identify.unknown", {}, key_id="k2", subject=None)  # another door: not folded with k1's
    time.sleep(0.15)
    first = [(c[2]["event"], c[2]["data"].get("identity"), c[2]["count"]) for c in rec.calls]
    assert sorted(first, key=str) == sorted([("identify.match", "Ann", 1), ("identify.match", "Bob", 1),
                                             ("identify.unknown", None, 1), ("identify.unknown", None, 1)], key=str)
    assert d.wait_idle(5)
    summary = [c[2] for c in rec.calls[4:]]
    assert len(summary) == 1 and summary[0]["count"] == 4 and summary[0]["data"]["identity"] == "Ann"
    assert summary[0]["first_time"] <= summary[0]["last_time"] and d.stats.folded == 4
    d.close()


def test_a_hook_for_one_key_hears_only_that_key_and_a_full_queue_drops_without_blocking():
    rec = Recorder()
    d = Dispatcher(lambda: [hook(key_id="door1", events=("verify.reject",))], rec, fold_window=0)
    d.publish("verify.reject", {"person": "Ann"}, key_id="door2", subject="Ann")
    d.publish("verify.accept", {"person": "Ann"}, key_id="door1", subject="Ann")
    d.publish("verify.reject", {"person": "Ann"}, key_id="door1", subject="Ann")
    assert d.wait_idle(5)
    assert [(c[2]["event"], c[2]["key_id"]) for c in rec.calls] == [("verify.reject", "door1")]
    d.close()

    stuck = threading.Event()
    d = Dispatcher(lambda: (stuck.wait(120), [])[1], Recorder(), queue_size=3)  # stuck scheduler
    for _ in range(50):  # a blocking publish would wait here for the stuck scheduler, and drop nothing
        d.publish("identify.match", {}, key_id=None, subject="Ann")
    assert d.stats.dropped >= 45
    stuck.set()
    d.close()


# ---------------------------------------------------------------------------------- through the service
@pytest.fixture
def served(tmp_path, fake_pipeline):
    """(client, keys, db, receiver factory) with real httpx delivery to receivers on 127.0.0.1."""
    path = tmp_path / "db"
    keys = make_db(path)
    # the receivers listen on 127.0.0.1: a private target, allowed here (refused by default: test_security.py)
    app = create_app(ServiceSettings(db=path, fold_window=0.5, hook_backoff=0.05, hook_timeout=5,
                                     allow_private_hooks=True), model=fake_pipeline)
    with TestClient(app) as client:
        wait_ready(client)
        yield client, keys, path


def add_hook(client, keys, url, events, key_id=None):
    r = client.post("/v1/hooks", json={"url": url, "events": events, "key_id": key_id},
                    headers={"X-API-Key": keys["admin"]})
    assert r.status_code == 201, r.text
    return r.json()["secret"]


def test_identify_events_are_signed_posted_and_retried_on_500(served):
    client, keys, _ = served
    with Receiver(script=[500, 500]) as rx, Receiver() as rx_unknown:
        secret = add_hook(client, keys, rx.url, ["identify.match"])
        add_hook(client, keys, rx_unknown.url, ["identify.unknown"])
        h = {"X-API-Key": keys["enroll"]}
        client.post("/v1/people/Ann/templates", files=[("photos", ("a.png", png([RED], 1)))], headers=h)
        r = client.post("/v1/identify", files={"photo": ("door.png", png([RED, BLUE], 2))}, headers=h)
        assert [f["identity"] for f in r.json()["faces"]] == ["Ann", None]
        got = rx.wait_for(3)  # 500, 500, then 200
        time.sleep(0.3)
        assert [g["status"] for g in rx.received] == [500, 500, 200]
        for rec in got:
            hd = {k.lower(): v for k, v in rec["headers"].items()}
            assert verify_signature(secret, hd["x-facedb-timestamp"], rec["body"], hd["x-facedb-signature"])
            mac = hmac.new(secret.encode(), hd["x-facedb-timestamp"].encode() + b"." + rec["body"], hashlib.sha256)
            assert hd["x-facedb-signature"] == "sha256=" + mac.hexdigest()
            assert hd["x-facedb-event"] == "identify.match"
        matches = rx.events()
        assert len({e["id"] for e in matches}) == 1  # the same delivery, retried
        assert matches[0]["data"]["identity"] == "Ann" and matches[0]["count"] == 1
        assert matches[0]["data"]["box"] == [0.0, 0.0, 40.0, 40.0]
        with FaceDB.open(served[2], readonly=True) as d:
            enroll_id = next(k.id for k in d.api_keys() if k.name == "enroll-key")
        assert matches[0]["key_id"] == enroll_id
        unknown = rx_unknown.wait_for(1)
        body = json.loads(unknown[0]["body"])
        assert body["event"] == "identify.unknown" and body["data"]["identity"] is None
        assert body["data"]["box"] == [40.0, 0.0, 80.0, 40.0]


def test_a_slow_receiver_never_delays_the_decision(served):
    """Judged by order, not the clock: every decision is answered while the receiver has answered no delivery
    (it is held until the end), so no decision waited for one."""
    client, keys, _ = served
    gate = threading.Event()
    with Receiver(gate=gate) as rx:
        try:
            add_hook(client, keys, rx.url, ["identify.match", "identify.unknown", "verify.reject"])
            h = {"X-API-Key": keys["enroll"]}
            client.post("/v1/people/Ann/vectors", json={"vectors": [E0]}, headers=h)
            for i in range(6):
                vec = E0 if i % 2 else np.eye(32)[i].tolist()
                r = client.post("/v1/identify/vector", json={"vector": vec}, headers=h)
                assert r.status_code == 200
            r = client.post("/v1/verify/vector", json={"person": "Ann", "vector": np.eye(32)[1].tolist()},
                            headers=h)
            assert r.json()["accepted"] is False
            rx.wait_for(1, timeout=60)  # a delivery has reached the receiver, which holds it
            assert rx.answered == 0
        finally:
            gate.set()
        got = rx.wait_for(3, timeout=60)
        assert {json.loads(g["body"])["event"] for g in got} >= {"identify.match", "identify.unknown"}


def test_repeats_for_one_person_fold_and_per_key_hooks_filter(served):
    client, keys, path = served
    with FaceDB.open(path, readonly=True) as d:
        ident_id = next(k.id for k in d.api_keys() if k.name == "identify-key")
    with Receiver() as everything, Receiver() as door:
        add_hook(client, keys, everything.url, ["*"])
        add_hook(client, keys, door.url, ["identify.match"], key_id=ident_id)
        client.post("/v1/people/Ann/vectors", json={"vectors": [E0]}, headers={"X-API-Key": keys["enroll"]})
        for _ in range(5):
            client.post("/v1/identify/vector", json={"vector": E0}, headers={"X-API-Key": keys["identify"]})
        client.post("/v1/identify/vector", json={"vector": E0}, headers={"X-API-Key": keys["enroll"]})
        client.delete("/v1/people/Ann", headers={"X-API-Key": keys["enroll"]})
        door_events = door.wait_for(2, timeout=5)
        all_events = everything.wait_for(5, timeout=5)
        time.sleep(0.7)
        door_bodies = [json.loads(r["body"]) for r in door_events]
        assert [(e["event"], e["count"], e["key_id"]) for e in door_bodies] == [
            ("identify.match", 1, ident_id), ("identify.match", 4, ident_id)]
        names = sorted((e["event"], e["count"]) for e in everything.events())
        assert names == sorted([("person.enrolled", 1), ("identify.match", 1), ("identify.match", 4),
                                ("identify.match", 1), ("person.removed", 1)])
        assert len(all_events) == 5
