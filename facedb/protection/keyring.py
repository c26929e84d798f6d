"""Template protection: keys, the keyring, and the file cipher. The only module that imports ``cryptography``.

Threat model: a stolen disk, a copied database directory or backup. Not a root attacker on a running host
(who can read the keys from memory). What this module provides:

* **The key-encryption key (KEK)** comes from outside the database directory, never from inside it: the
  ``FACEDB_KEY`` environment variable, a key file (``--key-file``) or a command that prints it
  (``--key-command``, for a KMS or a secrets manager). A KEK is 32 random bytes (64 hex digits, base64, or a
  32-byte binary file: what ``facedb genkey`` prints), stretched with HKDF-SHA256; anything else is a
  passphrase (at least 16 characters), stretched with scrypt (n=2^15, r=8, p=1: ~0.1-0.2 s per open).
* **The data key (DEK)**, 32 random bytes, encrypts the data. It is kept in the keyring file ``facedb.keys``
  in the database directory, *wrapped* (AES-256-GCM) by the KEK, with a version. Rotating the KEK re-wraps the
  DEK (fast: one small file rewritten); ``--reencrypt`` makes a new DEK and re-encrypts everything.
  Sub-keys are derived from the DEK with HKDF-SHA256, one per use (the SQLCipher store, the index file,
  evaluation caches), so no key serves two purposes.
* **The file cipher** (:class:`FileCipher`) encrypts whole files as a stream: AES-256-GCM over 4 MiB chunks
  with the STREAM construction (chunk counter and a last-chunk flag in the nonce, the header as associated
  data), under a key derived from the DEK and a random 128-bit file id. A reordered, truncated, extended or
  altered file fails authentication (:class:`~facedb.errors.TamperedError`); a file from another save
  (another file id) does not decrypt as this one, so the store's stamp of the file id also proves freshness.

Keyring format (JSON, ``facedb.keys``; nothing in it is secret without the KEK)::

    {"format": "facedb-keyring", "version": 1, "database_id": hex, "state": "active" | "encrypting" |
     "reencrypting", "key_version": N, "store_cipher": "...", "rotated_at": ISO time,
     "keys": [{"role": "current" | "next", "data_key_version": v, "kdf": {...}, "nonce": b64, "wrapped": b64}]}

Each entry is bound (as GCM associated data) to the database id and its data key version, so entries cannot
be moved between databases or versions. ``next`` entries exist only while ``facedb encrypt`` or
``rotate-key --reencrypt`` runs (see ``facedb/protection/encryption.py``, which recovers an interrupted one).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from ..errors import (
    EncryptionUnavailableError,
    InvalidInputError,
    KeyMissingError,
    TamperedError,
    WrongKeyError,
)
from ..fsio import fsync_dir, write_atomic

#: The keyring's file name on disk: a format, not a module path (it must never follow a module rename).
KEYRING_FILE = "facedb.keys"
#: The name development builds between the folder move (cdbc5f2) and its fix gave the keyring, when a
#: search-and-replace of module paths also rewrote this file name: such a keyring is renamed back when found.
MISNAMED_KEYRING_FILE = "facedb.operations.keys"
KEYRING_FORMAT = "facedb-keyring"
KEYRING_VERSION = 1
#: How the store is encrypted (recorded in the keyring so that a later release can migrate it).
STORE_CIPHER = "sqlcipher4; raw 256-bit key from HKDF-SHA256(DEK); 16 KiB pages"
#: The file cipher's name, recorded in the index stamp.
FILE_CIPHER = "aes-256-gcm-stream/4MiB"

ENV_KEY = "FACEDB_KEY"
ENV_KEY_FILE = "FACEDB_KEY_FILE"
ENV_KEY_COMMAND = "FACEDB_KEY_COMMAND"
ENV_NEW_KEY = "FACEDB_NEW_KEY"

MIN_PASSPHRASE = 16
SCRYPT = {"n": 2**15, "r": 8, "p": 1}
KEY_COMMAND_TIMEOUT = 60.0

_MAGIC = b"FDBENC1\n"
_HEADER = len(_MAGIC) + 16 + 4  # magic, file id, chunk size
CHUNK = 4 << 20
_TAG = 16


def _crypto() -> Any:
    """The ``cryptography`` primitives, or EncryptionUnavailableError saying how to install them."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    except ImportError:
        raise EncryptionUnavailableError(
            "encryption needs the crypto extra: pip install 'facedb[crypto]' (cryptography, sqlcipher3-binary)"
        ) from None

    class _C:
        pass

    c = _C()
    c.InvalidTag, c.hashes, c.AESGCM, c.HKDF, c.Scrypt = InvalidTag, hashes, AESGCM, HKDF, Scrypt
    return c


def available() -> bool:
    """Whether the crypto extra is installed (encryption can be used)."""
    try:
        _crypto()
        import sqlcipher3  # noqa: F401
    except (EncryptionUnavailableError, ImportError):
        return False
    return True


def hkdf(key: bytes, info: bytes, salt: bytes | None = None, length: int = 32) -> bytes:
    """HKDF-SHA256 of ``key`` for one purpose (``info``)."""
    c = _crypto()
    return c.HKDF(algorithm=c.hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


# ------------------------------------------------------------------------------------------------- the KEK
def generate_key() -> str:
    """A new random key-encryption key: 64 hex digits (256 bits), what ``facedb genkey`` prints."""
    return secrets.token_hex(32)


def _binary(material: bytes) -> bool:
    """32 bytes that are not printable text: a binary key file."""
    return len(material) == 32 and not all(32 <= b < 127 for b in material)


def _raw_key(text: bytes) -> bytes | None:
    """32 key bytes if ``text`` is a binary 32-byte key, 64 hex digits or base64 of 32 bytes; else None (a
    passphrase)."""
    if _binary(text):
        return text
    s = text.strip()
    if len(s) == 64:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(s.decode("ascii"))
    if len(s) in (43, 44):
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            with contextlib.suppress(binascii.Error, ValueError):
                raw = decode(s + b"=" * (-len(s) % 4))
                if len(raw) == 32:
                    return raw
    return None


@dataclass(frozen=True)
class KeySource:
    """Where the key-encryption key comes from: ``env`` (a variable's name), ``file`` or ``command`` (run by
    the shell; its standard output is the key), or ``value`` (given in the API). Read when needed, never
    stored. A key file must not be inside the database directory (that would defeat the encryption)."""

    env: str | None = None
    file: Path | None = None
    command: str | None = None
    value: bytes | None = field(default=None, repr=False)

    @classmethod
    def of(cls, key: object, *, env: str = ENV_KEY) -> KeySource | None:
        """A KeySource from what an API caller gave: a KeySource, the key itself (str or bytes), a key file
        (a ``pathlib.Path``), or None for the environment: ``FACEDB_KEY``, else ``FACEDB_KEY_FILE`` or
        ``FACEDB_KEY_COMMAND`` (None if none is set)."""
        if isinstance(key, KeySource):
            return key
        if isinstance(key, os.PathLike):
            return cls(file=Path(key))
        if isinstance(key, str):
            return cls(value=key.encode())
        if isinstance(key, (bytes, bytearray)):
            return cls(value=bytes(key))
        if key is None:  # the environment: the key itself, else a key file or a key command (as the CLI reads)
            if os.environ.get(env):
                return cls(env=env)
            if env == ENV_KEY and (os.environ.get(ENV_KEY_FILE) or os.environ.get(ENV_KEY_COMMAND)):
                return cls.from_options(Path(os.environ[ENV_KEY_FILE]) if os.environ.get(ENV_KEY_FILE) else None,
                                        os.environ.get(ENV_KEY_COMMAND) or None)
            return None
        raise InvalidInputError("key must be a string, bytes, a key file's Path or a "
                                "facedb.protection.keyring.KeySource")

    @classmethod
    def from_options(cls, key_file: Path | None, key_command: str | None, env: str = ENV_KEY) -> KeySource | None:
        """The CLI's choice: --key-file, else --key-command, else the environment variable (None if unset)."""
        if key_file is not None and key_command is not None:
            raise InvalidInputError("give --key-file or --key-command, not both")
        if key_file is not None:
            return cls(file=Path(key_file))
        if key_command:
            return cls(command=key_command)
        return cls(env=env) if os.environ.get(env) else None

    def describe(self) -> str:
        if self.file is not None:
            return f"key file {self.file}"
        if self.command is not None:
            return "key command"
        if self.env is not None:
            return f"${self.env}"
        return "the key given"

    def check_outside(self, root: Path) -> None:
        """InvalidInputError when the key file lies inside the database directory ``root``."""
        if self.file is None:
            return
        with contextlib.suppress(OSError):
            if Path(self.file).resolve().is_relative_to(Path(root).resolve()):
                raise InvalidInputError(f"the key file {self.file} is inside the database directory: keep keys "
                                        "apart from the data they protect (a stolen directory would hold both)")

    def material(self) -> bytes:
        """The key's bytes as given (KeyMissingError when the source yields nothing)."""
        if self.value is not None:
            data = self.value
        elif self.file is not None:
            try:
                data = Path(self.file).read_bytes()
            except OSError as exc:
                raise KeyMissingError(f"cannot read the key file {self.file}: {exc.strerror}") from None
        elif self.command is not None:
            data = _run_key_command(self.command)
        elif self.env is not None:
            data = os.environ.get(self.env, "").encode()
        else:
            data = b""
        if not _binary(data):  # a binary key file is kept as it is; text loses its surrounding white space
            data = data.strip()
        if not data:
            raise KeyMissingError(f"{self.describe()} gave no key")
        return data


def _run_key_command(command: str) -> bytes:
    try:
        done = subprocess.run(command, shell=True, capture_output=True, timeout=KEY_COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise KeyMissingError(f"the key command did not finish in {KEY_COMMAND_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise KeyMissingError(f"the key command failed (exit {done.returncode}): {why[0][:200]}")
    return done.stdout


def _kek(material: bytes, kdf: dict[str, Any]) -> bytes:
    """The 256-bit wrapping key from the KEK's material, by the entry's KDF (HKDF for random keys, scrypt for
    passphrases)."""
    salt = base64.b64decode(kdf["salt"])
    if kdf["name"] == "hkdf-sha256":
        raw = _raw_key(material)
        if raw is None:
            raise WrongKeyError("the key given is a passphrase, but this keyring entry was made with a 256-bit key")
        return hkdf(raw, b"facedb kek", salt)
    if kdf["name"] == "scrypt":
        c = _crypto()
        return c.Scrypt(salt=salt, length=32, n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"])).derive(material)
    raise WrongKeyError(f"unknown key derivation {kdf['name']!r} in the keyring")


def check_new_key(material: bytes) -> None:
    """InvalidInputError unless ``material`` may become a KEK: a 256-bit key, or a passphrase long enough."""
    if _raw_key(material) is None and len(material) < MIN_PASSPHRASE:
        raise InvalidInputError(f"a passphrase must have at least {MIN_PASSPHRASE} characters (or use a random "
                                "256-bit key: `facedb genkey`)")


def _new_kdf(material: bytes) -> dict[str, Any]:
    salt = base64.b64encode(os.urandom(16)).decode()
    if _raw_key(material) is not None:
        return {"name": "hkdf-sha256", "salt": salt}
    check_new_key(material)
    return {"name": "scrypt", "salt": salt, **SCRYPT}


# --------------------------------------------------------------------------------------------- the data key
@dataclass(frozen=True)
class DataKey:
    """An unwrapped data key and its version. Never printed (repr hides it)."""

    version: int
    secret: bytes = field(repr=False)

    def store_key(self) -> str:
        """The SQLCipher raw key: 64 hex digits (SQLCipher's ``x'...'`` form skips its own PBKDF2)."""
        return hkdf(self.secret, b"facedb sqlcipher store").hex()

    def file_cipher(self, purpose: str = "index") -> FileCipher:
        return FileCipher(hkdf(self.secret, b"facedb file cipher " + purpose.encode()), purpose)



@dataclass(frozen=True)
class Protection:
    """What an encrypted database's open needs: the data key and the versions ``stats`` reports."""

    key: DataKey = field(repr=False)
    key_version: int
    database_id: str

    @property
    def data_key_version(self) -> int:
        return self.key.version

    def store_key(self) -> str:
        return self.key.store_key()

    def index_cipher(self) -> FileCipher:
        return self.key.file_cipher("index")

    def cache_cipher(self) -> FileCipher:
        return self.key.file_cipher("evaluation cache")


def _aad(database_id: str, version: int) -> bytes:
    return json.dumps({"database_id": database_id, "data_key_version": version}, sort_keys=True).encode()


def wrap(material: bytes, secret: bytes, database_id: str, version: int, role: str) -> dict[str, Any]:
    """A keyring entry: ``secret`` (a data key) wrapped by the KEK ``material`` with AES-256-GCM."""
    c = _crypto()
    kdf = _new_kdf(material)
    nonce = os.urandom(12)
    wrapped = c.AESGCM(_kek(material, kdf)).encrypt(nonce, secret, _aad(database_id, version))
    return {"role": role, "data_key_version": version, "kdf": kdf, "nonce": base64.b64encode(nonce).decode(),
            "wrapped": base64.b64encode(wrapped).decode()}


def unwrap(material: bytes, entry: dict[str, Any], database_id: str) -> DataKey | None:
    """The entry's data key, or None when ``material`` is not the KEK that wrapped it."""
    c = _crypto()
    try:
        kek = _kek(material, entry["kdf"])
        secret = c.AESGCM(kek).decrypt(base64.b64decode(entry["nonce"]), base64.b64decode(entry["wrapped"]),
                                       _aad(database_id, int(entry["data_key_version"])))
    except (c.InvalidTag, WrongKeyError, KeyError, ValueError, TypeError, binascii.Error):
        return None
    return DataKey(int(entry["data_key_version"]), secret)


# --------------------------------------------------------------------------------------------- the keyring
def keyring_file(root: Path) -> Path:
    """The keyring of the database (or backup) folder ``root``: ``facedb.keys``. A keyring found under the name
    development builds misnamed it (:data:`MISNAMED_KEYRING_FILE`) and none under its own is renamed back first
    (``os.replace``: atomic; another process doing the same at once is harmless), so every reader, backup and
    restore finds it where every release looks."""
    root = Path(root)
    path, misnamed = root / KEYRING_FILE, root / MISNAMED_KEYRING_FILE
    if not path.exists() and misnamed.is_file():
        try:
            os.replace(misnamed, path)
            fsync_dir(root)
        except FileNotFoundError:  # another process renamed it first
            pass
        except OSError:  # a read-only folder (a mounted backup): read it where it is
            return misnamed
    return path


@dataclass
class Keyring:
    """The keyring file's content. :meth:`read` / :meth:`write` (atomic); :meth:`unlock` unwraps."""

    database_id: str
    key_version: int
    state: str = "active"
    keys: list[dict[str, Any]] = field(default_factory=list)
    rotated_at: str | None = None
    store_cipher: str = STORE_CIPHER

    @staticmethod
    def path(root: Path) -> Path:
        """``root``'s keyring file (renaming a keyring a development build misnamed, once, atomically)."""
        return keyring_file(root)

    @classmethod
    def exists(cls, root: Path) -> bool:
        return cls.path(root).is_file()

    @classmethod
    def read(cls, root: Path) -> Keyring:
        path = cls.path(root)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != KEYRING_FORMAT:
                raise ValueError("not a facedb keyring")
            if int(raw.get("version", 0)) > KEYRING_VERSION:
                raise ValueError(f"keyring version {raw['version']} is newer than this facedb knows")
            return cls(database_id=str(raw["database_id"]), key_version=int(raw["key_version"]),
                       state=str(raw.get("state", "active")), keys=list(raw["keys"]),
                       rotated_at=raw.get("rotated_at"), store_cipher=str(raw.get("store_cipher", STORE_CIPHER)))
        except OSError as exc:
            raise TamperedError(f"cannot read the keyring {path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise TamperedError(f"the keyring {path} is damaged ({exc}); restore it from a backup") from None

    def write(self, root: Path) -> None:
        self.rotated_at = self.rotated_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        data = {"format": KEYRING_FORMAT, "version": KEYRING_VERSION, "database_id": self.database_id,
                "state": self.state, "key_version": self.key_version, "store_cipher": self.store_cipher,
                "rotated_at": self.rotated_at, "keys": self.keys}
        old = os.umask(0o077)
        try:
            write_atomic(self.path(root), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
        finally:
            os.umask(old)

    @classmethod
    def new(cls, material: bytes) -> tuple[Keyring, DataKey]:
        """A keyring for a new encrypted database with a fresh data key (version 1) wrapped by ``material``."""
        ring = cls(database_id=secrets.token_hex(16), key_version=1)
        key = DataKey(1, os.urandom(32))
        ring.keys = [wrap(material, key.secret, ring.database_id, 1, "current")]
        return ring, key

    def unlock(self, material: bytes) -> dict[str, DataKey]:
        """{role: data key} for every entry ``material`` unwraps; WrongKeyError when it unwraps none."""
        out: dict[str, DataKey] = {}
        for entry in self.keys:
            role = str(entry.get("role", "current"))
            if role in out:
                continue
            key = unwrap(material, entry, self.database_id)
            if key is not None:
                out[role] = key
        if not out:
            raise WrongKeyError("the key given does not open this database (a wrong key, or its keyring "
                                f"{KEYRING_FILE} was altered); nothing was changed")
        return out

    def entries(self, role: str) -> list[dict[str, Any]]:
        return [e for e in self.keys if e.get("role", "current") == role]


# ------------------------------------------------------------------------------------------ the file cipher
class FileCipher:
    """AES-256-GCM for whole files, streamed in 4 MiB chunks (STREAM construction). One instance per purpose;
    every file gets its own random file id and a key derived from it, so (key, nonce) pairs never repeat."""

    name = FILE_CIPHER

    def __init__(self, key: bytes, purpose: str) -> None:
        self._key = key
        self.purpose = purpose

    def __repr__(self) -> str:
        return f"FileCipher({self.purpose!r})"

    @property
    def key_id(self) -> str:
        """A short public id of this cipher's key (names files made under it; reveals nothing of the key)."""
        return hmac.new(self._key, b"facedb key id", hashlib.sha256).hexdigest()[:16]

    def _aead(self, file_id: bytes) -> Any:
        return _crypto().AESGCM(hkdf(self._key, b"facedb file " + self.purpose.encode(), salt=file_id))

    @staticmethod
    def _nonce(counter: int, last: bool) -> bytes:
        return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")

    @contextlib.contextmanager
    def sealing(self, out: IO[bytes], chunk: int = CHUNK) -> Iterator[SealedWriter]:
        """Write an encrypted file to ``out``: feed plaintext to the writer's ``write``; the last chunk is sealed
        when the block ends (not when it raises)."""
        writer = SealedWriter(self, out, chunk)
        yield writer
        writer.finish()

    def opening(self, src: IO[bytes], file_id: str | None = None) -> OpenedReader:
        """A reader of the plaintext of ``src``; TamperedError on any failure of authentication, or when the
        file's id is not ``file_id`` (a file from another save)."""
        return OpenedReader(self, src, file_id)

    def seal(self, data: bytes) -> tuple[bytes, str]:
        """(ciphertext, file id) of ``data``, whole."""
        import io

        buf = io.BytesIO()
        with self.sealing(buf) as w:
            w.write(data)
        return buf.getvalue(), w.file_id

    def open(self, data: bytes, file_id: str | None = None) -> bytes:
        import io

        return self.opening(io.BytesIO(data), file_id).read_all()

    @staticmethod
    def file_id_of(head: bytes) -> str | None:
        """The file id in an encrypted file's first bytes, or None if it is not one of these files."""
        if len(head) < _HEADER or not head.startswith(_MAGIC):
            return None
        return head[len(_MAGIC):len(_MAGIC) + 16].hex()

    @staticmethod
    def is_sealed(head: bytes) -> bool:
        return head.startswith(_MAGIC)


class SealedWriter:
    def __init__(self, cipher: FileCipher, out: IO[bytes], chunk: int) -> None:
        self._out = out
        self._chunk = chunk
        fid = os.urandom(16)
        self.file_id = fid.hex()
        self._header = _MAGIC + fid + chunk.to_bytes(4, "big")
        self._aead = cipher._aead(fid)
        self._buf = bytearray()
        self._counter = 0
        self.plain_bytes = 0
        out.write(self._header)

    def write(self, data: bytes) -> int:
        self._buf += data
        self.plain_bytes += len(data)
        while len(self._buf) > self._chunk:  # a full chunk is sealed as "not last" only once more data follows
            self._emit(bytes(self._buf[:self._chunk]), last=False)
            del self._buf[:self._chunk]
        return len(data)

    def _emit(self, block: bytes, last: bool) -> None:
        self._out.write(self._aead.encrypt(FileCipher._nonce(self._counter, last), block, self._header))
        self._counter += 1

    def finish(self) -> None:
        self._emit(bytes(self._buf), last=True)
        self._buf = bytearray()


class OpenedReader:
    def __init__(self, cipher: FileCipher, src: IO[bytes], file_id: str | None) -> None:
        self._src = src
        header = src.read(_HEADER)
        fid = FileCipher.file_id_of(header)
        if fid is None:
            raise TamperedError(f"not an encrypted facedb file ({cipher.purpose})")
        if file_id is not None and fid != file_id:
            raise TamperedError(f"the {cipher.purpose} file is not the one the store recorded (another save)")
        self._header = header
        self._chunk = int.from_bytes(header[-4:], "big")
        if not 0 < self._chunk <= 1 << 30:
            raise TamperedError(f"the {cipher.purpose} file's header is damaged")
        self._aead = cipher._aead(bytes.fromhex(fid))
        self._invalid_tag = _crypto().InvalidTag
        self._purpose = cipher.purpose
        self._counter = 0
        self._plain = memoryview(b"")
        self._pos = 0
        self._ahead = src.read(self._chunk + _TAG)
        self.done = False

    def _next(self) -> None:
        block = self._ahead
        self._ahead = self._src.read(self._chunk + _TAG) if len(block) == self._chunk + _TAG else b""
        last = not self._ahead
        try:
            plain = self._aead.decrypt(FileCipher._nonce(self._counter, last), block, self._header)
        except self._invalid_tag:
            raise TamperedError(f"the {self._purpose} file failed authentication (altered, truncated or "
                                "damaged)") from None
        self._counter += 1
        self._plain, self._pos = memoryview(plain), 0
        self.done = last

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of plaintext (all that is left for n < 0); b"" at the end."""
        if n < 0:
            return self.read_all()
        while self._pos >= len(self._plain):
            if self.done:
                return b""
            self._next()
        out = self._plain[self._pos:self._pos + n]
        self._pos += len(out)
        return bytes(out)

    def read_all(self) -> bytes:
        parts = [bytes(self._plain[self._pos:])]
        while not self.done:
            self._next()
            parts.append(bytes(self._plain))
        self._pos = len(self._plain)
        return b"".join(parts)

    def finish(self) -> None:
        """Authenticate the rest of the file (what the reader's user did not need to read)."""
        while not self.done:
            self._next()
        self._pos = len(self._plain)


def sealed_file_id(path: Path) -> str | None:
    """The file id of an encrypted facedb file at ``path``; None if it is missing or not one."""
    try:
        with open(path, "rb") as f:
            return FileCipher.file_id_of(f.read(_HEADER))
    except OSError:
        return None
