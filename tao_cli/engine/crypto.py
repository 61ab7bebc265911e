"""Whole-file checkpoint encryption: AES-256-GCM with a scrypt-derived key (layout in docs/encryption.md).

Layout (all integers big-endian)::

    offset size  field
    0      6     magic  b"TAOENC"
    6      1     version (1)
    7      1     kdf id (1 = scrypt)
    8      4     scrypt log2(n)  (15)
    12     4     scrypt r        (8)
    16     4     scrypt p        (1)
    20     16    salt (random per file)
    36     12    nonce (random per file)
    48     ...   ciphertext || 16-byte GCM tag

The 48-byte header is passed to GCM as associated data, so changing any header byte fails authentication too.
"""
from __future__ import annotations

import os
import struct

from networks.common.errors import CheckpointError

__all__ = ["MAGIC", "VERSION", "HEADER_SIZE", "is_encrypted", "encrypt_bytes", "decrypt_bytes"]

MAGIC = b"TAOENC"
VERSION = 1
KDF_SCRYPT = 1
_HEADER = struct.Struct(">6sBBIII16s12s")
HEADER_SIZE = _HEADER.size  # 48
_TAG_SIZE = 16
_DEFAULT_LOG2_N, _DEFAULT_R, _DEFAULT_P = 15, 8, 1
# The only scrypt parameters a header may carry: the ones we write.  scrypt's cost is chosen by the file, so
# any wider range lets a crafted header make key derivation take tens of seconds and gigabytes (log2 n=20,
# r=16, p=4 took 48 s and 3.4 GB) before the tag check can refuse it.  Derivation with these takes ~32 MiB.
_ACCEPTED_KDF_PARAMS = (_DEFAULT_LOG2_N, _DEFAULT_R, _DEFAULT_P)


def is_encrypted(data: bytes) -> bool:
    """True when ``data`` starts with the encryption magic."""
    return data[: len(MAGIC)] == MAGIC


def _derive(key: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    kdf = Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p)
    return kdf.derive(key.encode("utf-8"))


def encrypt_bytes(plain: bytes, key: str) -> bytes:
    """Encrypt ``plain`` with ``key`` and return header + ciphertext + tag."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not key:
        raise CheckpointError("encryption_key", "is empty", "set a non-empty key or leave it unset")
    salt, nonce = os.urandom(16), os.urandom(12)
    header = _HEADER.pack(MAGIC, VERSION, KDF_SCRYPT, _DEFAULT_LOG2_N, _DEFAULT_R, _DEFAULT_P, salt, nonce)
    aes = AESGCM(_derive(key, salt, _DEFAULT_LOG2_N, _DEFAULT_R, _DEFAULT_P))
    return header + aes.encrypt(nonce, plain, header)


def decrypt_bytes(data: bytes, key: str | None, source: str = "checkpoint") -> bytes:
    """Return the plaintext of an encrypted file; ``source`` names the file in errors.

    Raises ``CheckpointError`` with distinct messages for: no key, not an encrypted tao checkpoint / bad header,
    unsupported version, and wrong key or modified file (GCM cannot tell those two apart).
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not is_encrypted(data):
        raise CheckpointError(source, "is not an encrypted tao checkpoint (bad magic)")
    if len(data) < HEADER_SIZE + _TAG_SIZE:
        raise CheckpointError(source, "is not an encrypted tao checkpoint (truncated header)")
    magic, version, kdf, log2_n, r, p, salt, nonce = _HEADER.unpack(data[:HEADER_SIZE])
    if version != VERSION:
        raise CheckpointError(source, f"unsupported encrypted checkpoint version {version} (this tao-cli reads {VERSION})",
                              "upgrade tao-cli")
    if kdf != KDF_SCRYPT or (log2_n, r, p) != _ACCEPTED_KDF_PARAMS:
        # refused before any key derivation: the header, not the key, is wrong
        raise CheckpointError(source, f"is not an encrypted tao checkpoint (unsupported key-derivation parameters "
                              f"kdf={kdf}, log2 n={log2_n}, r={r}, p={p}; tao-cli writes and reads only scrypt with "
                              f"log2 n={_DEFAULT_LOG2_N}, r={_DEFAULT_R}, p={_DEFAULT_P})")
    if not key:
        raise CheckpointError(source, "is encrypted but no encryption_key was given",
                              "pass encryption_key=<key> used when the checkpoint was saved")
    aes = AESGCM(_derive(key, salt, log2_n, r, p))
    try:
        return aes.decrypt(nonce, data[HEADER_SIZE:], data[:HEADER_SIZE])
    except InvalidTag:
        raise CheckpointError(source, "cannot be decrypted: wrong encryption_key or the file was modified") from None
