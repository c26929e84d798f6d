"""The gallery: the store (the truth), the derived index and its upkeep, the query engine and the decision rules."""

from typing import Any


def __getattr__(name: str) -> Any:
    # The old facedb/gallery.py module's names, now facedb.gallery.indexed's, for one release (facedb/moved.py).
    from ..moved import OLD_GALLERY_NAMES, warn_moved

    if name in OLD_GALLERY_NAMES:
        warn_moved(f"facedb.gallery.{name}", f"facedb.gallery.indexed:{name}", stacklevel=2)
        from . import indexed

        value = globals()[name] = getattr(indexed, name)  # warned once: later lookups find it here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
