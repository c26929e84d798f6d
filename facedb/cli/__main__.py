"""``python -m facedb.cli``: the same as the ``facedb`` command."""

from . import main

main()
