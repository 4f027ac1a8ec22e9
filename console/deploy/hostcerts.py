"""Host certificates as ssh checks them against a known_hosts `@cert-authority` line (PROTOCOL.certkeys):
signed by that authority, a host certificate, naming this host among its principals, valid now."""

from __future__ import annotations

import time
from dataclasses import dataclass

import paramiko

CERT_SUFFIX = "-cert-v01@openssh.com"
HOST_CERT = 2  # the certificate's type field: 1 is a user certificate, 2 a host's
FOREVER = 2**64 - 1  # valid_before of a certificate that never expires

# The host key algorithms paramiko can check, certificates first: offered in that order to a host some
# @cert-authority line vouches for, as ssh prefers a certificate where it knows an authority.
CERT_KEY_TYPES = ("ssh-ed25519" + CERT_SUFFIX, "ecdsa-sha2-nistp256" + CERT_SUFFIX, "ecdsa-sha2-nistp384" + CERT_SUFFIX,
                  "ecdsa-sha2-nistp521" + CERT_SUFFIX, "rsa-sha2-512" + CERT_SUFFIX, "rsa-sha2-256" + CERT_SUFFIX)


class BadCertificate(Exception):
    """Why a host's certificate is not good for it (one line)."""


@dataclass(frozen=True)
class HostCertificate:
    """The fields of an OpenSSH certificate that say whom it is for and who signed it."""

    key_type: str  # e.g. ssh-ed25519-cert-v01@openssh.com
    cert_type: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: bytes
    signature_key: bytes  # the authority's public key blob
    signed: bytes  # everything the signature covers
    signature: bytes


def is_certificate(key: paramiko.PKey) -> bool:
    blob = key.public_blob
    return blob is not None and blob.key_type.endswith(CERT_SUFFIX)


class _Reader:
    """The SSH wire types of a blob, read strictly (paramiko's Message pads a short read with zeros)."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.at = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.blob):
            raise BadCertificate("a certificate cut short")
        out = self.blob[self.at:self.at + n]
        self.at += n
        return out

    def uint32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def uint64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def string(self) -> bytes:
        return self.take(self.uint32())

    def text(self) -> str:
        try:
            return self.string().decode()
        except UnicodeDecodeError:
            raise BadCertificate("a certificate with a name that is not UTF-8") from None


def parse(blob: bytes) -> HostCertificate:
    """The certificate in an OpenSSH certificate blob; BadCertificate if it is not one corral can read."""
    reader = _Reader(blob)
    key_type = reader.text()
    base = key_type[:-len(CERT_SUFFIX)] if key_type.endswith(CERT_SUFFIX) else ""
    # The certified key's own fields, by type: skipped (the key is the one the host proved it holds).
    fields = {"ssh-ed25519": 1, "ssh-rsa": 2}.get(base, 2 if base.startswith("ecdsa-sha2-") else 0)
    if not fields:
        raise BadCertificate(f"a certificate of type {key_type[:80]!r}, which corral cannot read")
    reader.string()  # nonce
    for _ in range(fields):
        reader.string()
    reader.uint64()  # serial
    cert_type = reader.uint32()
    key_id = reader.text()
    names = _Reader(reader.string())
    principals = []
    while names.at < len(names.blob):
        principals.append(names.text())
    valid_after, valid_before = reader.uint64(), reader.uint64()
    critical_options = reader.string()
    reader.string()  # extensions (none is defined for host certificates)
    reader.string()  # reserved
    signature_key = reader.string()
    signed = blob[:reader.at]
    signature = reader.string()
    if reader.at != len(blob):
        raise BadCertificate("a certificate with bytes after its signature")
    return HostCertificate(key_type, cert_type, key_id, tuple(principals), valid_after, valid_before,
                           critical_options, signature_key, signed, signature)


def check(cert: HostCertificate, authority: paramiko.PKey, names: tuple[str, ...], now: float | None = None) -> None:
    """Nothing if `authority` signed this host certificate for one of `names`, valid now; else BadCertificate."""
    if cert.signature_key != authority.asbytes():
        raise BadCertificate("a certificate signed by another authority")
    if not authority.verify_ssh_sig(cert.signed, paramiko.Message(cert.signature)):
        raise BadCertificate("a certificate whose signature does not verify")
    if cert.cert_type != HOST_CERT:
        raise BadCertificate("a user certificate, not a host certificate")
    if not any(name in cert.principals for name in names):
        shown = ", ".join(cert.principals[:5]) or "none"
        raise BadCertificate(f"a certificate for {shown}, not for {' or '.join(names)}")
    moment = time.time() if now is None else now
    if moment < cert.valid_after:
        raise BadCertificate(f"a certificate not valid before {_when(cert.valid_after)}")
    if cert.valid_before != FOREVER and moment >= cert.valid_before:
        raise BadCertificate(f"a certificate that expired {_when(cert.valid_before)}")
    if cert.critical_options:  # none is defined for host certificates: one we do not know is refused, as ssh does
        raise BadCertificate("a certificate with critical options")


def _when(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(min(seconds, 253402300799)))
