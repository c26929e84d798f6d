"""Commands that protect templates at rest: genkey, encrypt, rotate-key (docs/protection.md).

The key-encryption key comes from ``--key-file``, ``--key-command`` or ``$FACEDB_KEY`` (options of every
command); a new one for ``rotate-key`` from ``--new-key-file``, ``--new-key-command`` or ``$FACEDB_NEW_KEY``.
Keys are never printed, except by ``genkey``, whose job that is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import InvalidInputError
from . import command, emit_kv, state


@command()
def genkey(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option(help="Write the key to this file (created 0600, never overwritten) "
                                                  "instead of printing it.")] = None,
) -> None:
    """Make a new random 256-bit key (64 hex digits) for --key-file / $FACEDB_KEY. Keep it outside the database
    directory: whoever has both has the templates."""
    from ..protection.keyring import generate_key

    key = generate_key()
    if out is None:
        typer.echo(key)
        return
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidInputError(f"{out} exists: a key file is never overwritten (that would lose a key)") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot create {out}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    emit_kv(ctx, {"key_file": str(out)})


@command()
def encrypt(ctx: typer.Context) -> None:
    """Encrypt an existing plain database in place, under the key from --key-file, --key-command or $FACEDB_KEY.
    Atomic (killed at any moment, the database opens as before or encrypted); the plain files are overwritten
    and deleted. Every other process using the database must be stopped first."""
    from ..db import FaceDB

    st = state(ctx)
    key = st.key()
    if key is None:
        raise InvalidInputError("encrypt needs a key: --key-file, --key-command or $FACEDB_KEY (`facedb genkey` "
                                "makes one)")
    emit_kv(ctx, FaceDB.encrypt(st.db, key=key).to_dict())


@command(name="rotate-key")
def rotate_key(
    ctx: typer.Context,
    new_key_file: Annotated[Path | None, typer.Option(help="File holding the new key (else $FACEDB_NEW_KEY).")
                            ] = None,
    new_key_command: Annotated[str | None, typer.Option(help="Command that prints the new key.")] = None,
    reencrypt: Annotated[bool, typer.Option(help="Also make a new data key and re-encrypt the whole database "
                                                 "(needs every other process stopped); without it only the "
                                                 "keyring is rewritten (fast).")] = False,
) -> None:
    """Change the key-encryption key (the key in use: --key-file, --key-command or $FACEDB_KEY). The old key no
    longer opens the database afterwards (copies and backups made before keep needing it)."""
    from ..db import FaceDB
    from ..protection.keyring import ENV_NEW_KEY, KeySource

    st = state(ctx)
    new = KeySource.from_options(new_key_file, new_key_command, env=ENV_NEW_KEY)
    if new is None and not reencrypt:
        raise InvalidInputError("give the new key (--new-key-file, --new-key-command or $FACEDB_NEW_KEY), or "
                                "--reencrypt to renew the data key under the same key")
    emit_kv(ctx, FaceDB.rotate_key(st.db, key=st.key(), new_key=new, reencrypt=reencrypt).to_dict())
