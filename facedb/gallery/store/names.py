"""People's names, metadata and external ids as the store takes them: the checks every interface's input goes
through (:func:`check_name`, metadata and external-id limits), NFC normalisation, and the one order and search
of people (:func:`name_sort_key`, :func:`name_search_key`) whose keys the ``people`` table stores.

Its own module because the rules are pure text (no SQL) and are used by the people table, by migrations 4 and
11, and by the interfaces (the CLI checks a folder's name before it embeds anything).

* Names are compared as people read them: every name is normalised to Unicode NFC where it enters (enrol,
  add, rename, remove, show, verify; folder names too), so "José" typed and "José" from a macOS folder (NFD)
  are one person.
* Lists of people are in one order and searched one way in every interface (API, CLI, HTTP, console), both
  decided here: :func:`name_sort_key` and :func:`name_search_key` (case- and accent-insensitive; not a locale's
  collation, so the same on every machine). Each person's keys are stored beside the name (``sort_key``,
  ``search_key``: migration 11), so that SQL orders, pages and counts with them (an index serves ``ORDER BY
  sort_key LIMIT``) with either driver and no function registered on the connection. Exact-name lookups (enrol
  into, show, rename, remove) stay exact NFC matches.
"""

from __future__ import annotations

import json
import unicodedata

from ...errors import InvalidInputError

MAX_NAME_LENGTH = 256
#: A person's metadata, as stored JSON (bytes), and their external id (characters): limits for every interface.
MAX_METADATA_BYTES = 16 * 1024
MAX_EXTERNAL_ID_LENGTH = 256
#: The last words of the service's person routes (/v1/people/{name}/templates, ...; the console's .../rename,
#: .../update, .../remove): a name with '/' may not end in one (check_name).
NAME_ROUTE_WORDS = ("templates", "vectors", "rename", "update", "remove")


def normalise_name(name: object) -> str:
    """A name as people read it: Unicode NFC (a typed "é" and a macOS file name's "e" + accent are equal)."""
    if not isinstance(name, str):
        raise InvalidInputError("a person's name must be a string")
    return unicodedata.normalize("NFC", name)


# What "accent" means when names are searched and ordered: the combining diacritical marks (U+0300-036F and
# the blocks that extend them: acute, grave, diaeresis, caron, cedilla, ring, tilde...). Marks of other scripts
# (Indic vowel signs, the kana voicing marks, Hebrew points) spell different letters there, so they count.
_ACCENTS = ((0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF), (0xFE20, 0xFE2F))
# Letters with a stroke or bar that Unicode does not decompose into a letter and a mark, but that people
# type as the bare letter ("lodz" for "Łódź", "orsted" for "Ørsted"); after case folding, so lower case only.
_BARE = str.maketrans({"ø": "o", "ł": "l", "đ": "d", "ħ": "h", "ŧ": "t", "ƀ": "b", "ɨ": "i", "ƶ": "z"})
# Joins the parts of a stored key; a control character, which no name holds (check_name), and the lowest
# code point there is, so a shorter part sorts first ("ann" before "anna") exactly as in a tuple.
_KEY_SEP = "\x01"


def _fold_case(text: str) -> str:
    """Compatibility-decomposed and case-folded: Python's documented caseless match (NFKD, casefold, NFKD):
    "ß" and "SS", full-width "Ａ" and "A", "ﬁ" and "fi" are alike; accents are still there, decomposed."""
    return unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold())


def name_search_key(text: str) -> str:
    """``text`` as a search compares it: case-folded (:func:`_fold_case`), without accents, recomposed (NFC).
    A name matches a query when the query's key is part of the name's: "jose" finds "José", "ÉMILE" finds
    "Émile", "strasse" finds "Straße", "lodz" finds "Łódź"."""
    bare = "".join(c for c in _fold_case(text) if not any(lo <= ord(c) <= hi for lo, hi in _ACCENTS))
    return unicodedata.normalize("NFC", bare.translate(_BARE))


def name_sort_key(name: str) -> str:
    """The order of every list of people: a simplified Unicode ordering, not a locale's collation, so the same
    on every machine and in every interface. Names compare by their base letters first, case- and
    accent-insensitively (:func:`name_search_key`), then accents (unaccented first: "angel", "Ángel"), then
    case (the name's code points: "Anna", "anna"). So "zoe", "Émile", "bea", "Bob", "anna", "Ángel" are
    listed "Ángel", "anna", "bea", "Bob", "Émile", "zoe". Letters Unicode gives no base letter (æ, œ, þ) and other
    scripts follow their code points, after the Latin letters. Unicode's stability policies keep NFKD and case
    folding of assigned characters fixed, so a stored key stays right across Python versions."""
    name = normalise_name(name)
    return _KEY_SEP.join((name_search_key(name), _fold_case(name), name))


def name_search_text(name: str, external_id: str | None) -> str:
    """What a person's search matches against: their name's and their external id's search keys."""
    keys = [name_search_key(name)] + ([name_search_key(external_id)] if external_id else [])
    return _KEY_SEP.join(keys)


def _search_needle(query: str) -> str:
    # without the separator, a query can never match across a name and an external id
    return name_search_key(normalise_name(query)).replace(_KEY_SEP, "")


def check_name(name: object) -> str:
    name = normalise_name(name) if isinstance(name, str) else name
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError("a person's name must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"a person's name is at most {MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise InvalidInputError("a person's name may not contain control characters")
    # Invisible format characters (zero-width space, bidi overrides) make two names look alike or a name look
    # like another; the joiners some scripts spell with (ZWNJ, ZWJ) stay allowed.
    hidden = [c for c in name if unicodedata.category(c) == "Cf" and c not in "\u200c\u200d"]
    if hidden:
        raise InvalidInputError(f"a person's name may not contain invisible characters (U+{ord(hidden[0]):04X})")
    if name != name.strip():
        raise InvalidInputError("a person's name may not start or end with white space")
    if name in (".", ".."):  # browsers and HTTP clients resolve them as path steps: no URL could reach the person
        raise InvalidInputError(f"a person's name may not be {name!r}")
    if "/" in name:
        # A name is a path in the service's URLs (/v1/people/{name}/...): "Ann/templates" would be read as Ann's
        # templates, and clients collapse "//" and resolve "." and ".." steps (issue #25). Such names are refused
        # everywhere (CLI and API alike), so that every person can be reached by name over HTTP.
        parts = name.split("/")
        if any(p.strip() in ("", ".", "..") for p in parts) or parts[-1] in NAME_ROUTE_WORDS:
            raise InvalidInputError(
                f"a person's name with '/' is a URL path too: no empty, '.' or '..' part, and no last part "
                f"{', '.join(repr(w) for w in NAME_ROUTE_WORDS)} (it would name a route); got {name!r}")
    return name


def _check_metadata(metadata: object) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, dict):
        raise InvalidInputError("metadata must be a JSON object (a dict)")
    try:
        text = json.dumps(metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata is not JSON-serialisable: {exc}") from None
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:  # a badge number and a department, not a document
        raise InvalidInputError(f"a person's metadata is at most {MAX_METADATA_BYTES} bytes as JSON")
    return text


def _check_external_id(external_id: object) -> None:
    if not isinstance(external_id, str) or not external_id:
        raise InvalidInputError("external_id must be a non-empty string")
    if len(external_id) > MAX_EXTERNAL_ID_LENGTH:
        raise InvalidInputError(f"external_id is at most {MAX_EXTERNAL_ID_LENGTH} characters")

