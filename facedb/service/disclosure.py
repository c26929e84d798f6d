"""What a decision route may tell its caller, and what it may take from them: least disclosure by key (issue #25).

A door's key (scope ``identify``) lives in a device on a wall; whoever takes the device has the key. Two things
such a key must never do:

* **Set the policy.** A per-call ``threshold`` is refused (403, recorded as ``denied``) for identify keys on every
  decision route, photo and vector, identify and verify, over HTTP and in the console: with ``threshold: -1`` a
  stolen door key was accepted as anyone. We refuse rather than allow "stricter only": a door has no reason to
  choose its own threshold, a refusal is visible in the trail, and one rule is easier to audit than a comparison
  with a threshold that the gallery rule moves as the gallery grows. Enroll and admin keys keep the per-call
  threshold (they can change the gallery and, for admin, the stored policy anyway).
* **Read the gallery.** A similarity is an inner product with a template: 128 unit-vector probes with k = 1000
  returned every enrolled template (cosine 1.0). So an identify key without the ``candidates`` grant
  (:data:`facedb.operations.keys.GRANTS`) is answered with the decision only: identity or null, external id and a
  confidence *band* (:func:`band`) for a match, nothing for an unknown; no candidates, no raw similarity, no
  threshold. It may send one vector per call, k is 1, and asking for more (k > 1, several vectors) is refused
  (403, ``denied``) so that the attempt is in the audit trail. Verify answers a name that is not enrolled (or has
  no templates) exactly as a refused claim: 200, ``accepted: false``, so a door key cannot list who is enrolled.

Score quantisation and query limits are the known counters to hill-climbing (ISO/IEC 24745's template
protection; Adler, "Images can be regenerated from quantized biometric match score data", 2004): three bands,
given only for accepted matches, leave a climber nothing to climb on until it has already matched.
"""

from __future__ import annotations

from typing import Any

from ..errors import PermissionDeniedError, TooManyRequestsError
from .auth import Caller, denied_to_record

#: Bands of an accepted match, by where its similarity lies between the threshold it had to reach and 1: the
#: lower third "low", the middle "medium", the top "high". Relative to the threshold so that they mean the same
#: for every model (dlib-resnet's threshold is ~0.93, facenet's ~0.4).
BANDS = ("low", "medium", "high")


def band(similarity: float | None, threshold: float, accepted: bool) -> str | None:
    """The coarse confidence of a decision: a :data:`BANDS` name for an accepted match, None otherwise (an
    unknown tells nothing about how near it came: that nearness is what a hill-climbing attack follows)."""
    if not accepted or similarity is None:
        return None
    span = 1.0 - threshold
    where = (similarity - threshold) / span if span > 1e-9 else 1.0
    return BANDS[min(2, max(0, int(where * 3)))]


def refuse(caller: Caller, reason: str, message: str) -> None:
    """Record ``denied`` (with ``reason``) under the caller's key and raise PermissionDeniedError(``message``): a
    door key asking for what it is not allowed leaves a trace, as a too-narrow scope does (auth.admit)."""
    refusals = denied_to_record(caller.state, caller.address, caller.key.id, reason)
    if refusals is not None:  # bounded like failed authentications: a refusal loop cannot flood the trail
        with caller as db:
            db.note("denied", detail={"reason": reason, "address": caller.address, "refusals": refusals})
    wait = caller.state.guard.failed(caller.address, caller.key.id)  # throttled as failed authentications are
    if wait > 0:
        raise TooManyRequestsError("too many refused requests: retry later", wait)
    raise PermissionDeniedError(message)


def check_policy(caller: Caller, threshold: float | None) -> None:
    """Refuse a per-call threshold from a key that may not set the policy (see the module's docstring)."""
    if threshold is not None and not caller.key.sets_policy:
        refuse(caller, "per-call threshold from an identify key",
               "the decision threshold is the database's policy, set by an admin: an identify key cannot send "
               "its own (leave out 'threshold')")


def check_reach(caller: Caller, k: int | None, probes: int = 1) -> int:
    """The k to search with: the caller's ``k`` (5 when not given) for a key told candidates; 1 for a door key,
    which is refused (recorded) when it asks for k > 1 or several probes in one call."""
    if caller.key.full_answers:
        return 5 if k is None else k
    if k is not None and k > 1:
        refuse(caller, f"k={k} from an identify key without the candidates grant",
               "candidate lists (k > 1) need a key with the 'candidates' grant: this key is told the decision only "
               "(leave out 'k' or send 1)")
    if probes > 1:
        refuse(caller, f"{probes} vectors in one call from an identify key without the candidates grant",
               "one vector per call for this key (several need the 'candidates' grant)")
    return 1


def identification(caller: Caller, answer: dict[str, Any]) -> dict[str, Any]:
    """An identify answer (one face's or one vector's) as this caller may see it."""
    if caller.key.full_answers:
        return answer
    kept = {k: answer[k] for k in ("image", "box", "det_score") if k in answer}  # about the caller's own photo
    return {**kept, "identity": answer["identity"], "external_id": answer["identity"] and answer.get("external_id"),
            "confidence": band(answer.get("similarity"), answer["threshold"], answer["identity"] is not None)}


def verification(caller: Caller, answer: dict[str, Any]) -> dict[str, Any]:
    """A verify answer as this caller may see it: for a door key the same keys whether the claim was refused or
    the name is not enrolled at all."""
    if caller.key.full_answers:
        return answer
    accepted = bool(answer["accepted"])
    return {"name": answer["name"], "accepted": accepted,
            "external_id": answer.get("external_id") if accepted else None,
            "confidence": band(answer.get("similarity"), answer.get("threshold", 1.0), accepted)}
