"""Secrets read from files (``--admin-token-file``, ``--memcached-secret-file``):
a command line is readable by every user of the host (``ps``), a file can be
the owner's alone.
As ssh refuses a private key that others may read, a secret file that its
group or others may read, or write, is refused, and so is one that belongs
to another user (who could rewrite it), unless to root."""

from __future__ import annotations

import os
import stat


def read_secret_file(path: str, minimum: int = 1) -> bytes:
    """The secret in the file at ``path``, without surrounding white space;
    ValueError saying what is wrong when the file cannot be read, is open to
    others, belongs to another user, or holds fewer than ``minimum`` bytes."""
    try:
        # O_NONBLOCK: a named pipe is refused below instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        found = os.fstat(fd)
        mode = found.st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is not a file")
        if found.st_uid not in (os.geteuid(), 0):
            raise ValueError(
                f"{path} belongs to user {found.st_uid}, not to this process's user "
                f"({os.geteuid()}) nor to root: chown it to the user the service runs as"
            )
        if mode & 0o077:
            raise ValueError(
                f"{path} is open to others (mode {stat.S_IMODE(mode):04o}): "
                f"make it the owner's alone (chmod 600 {path})"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            secret = f.read().strip()
    finally:
        os.close(fd)
    if not secret:
        raise ValueError(f"{path} is empty")
    if len(secret) < minimum:
        raise ValueError(f"{path} holds fewer than {minimum} bytes")
    return secret
