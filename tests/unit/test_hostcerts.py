"""Host certificates read and judged as ssh does (console/deploy/hostcerts.py), on certificates ssh-keygen makes."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import paramiko
import pytest

from corral.console.deploy import hostcerts
from scripts.sshlab import SSH_KEYGEN, keygen


def keypair(path: Path) -> paramiko.PKey:
    """A new ed25519 key pair at path (the lab's keygen), its public half as paramiko reads it."""
    key_type, b64 = keygen(path).split()[:2]
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(b64))


def certificate(tmp_path: Path, signer: Path, *how: str, name: str = "") -> bytes:
    """A certificate of a fresh host key (tmp_path/name), signed by `signer`, as the blob a host sends."""
    host = tmp_path / (name or f"host{len(list(tmp_path.iterdir()))}")
    keypair(host)
    subprocess.run([SSH_KEYGEN, "-q", "-s", str(signer), "-I", "test", *how, str(host) + ".pub"], check=True,
                   capture_output=True)
    return base64.b64decode(Path(str(host) + "-cert.pub").read_text().split()[1])


@pytest.fixture
def ca(tmp_path: Path) -> tuple[Path, paramiko.PKey]:
    return tmp_path / "ca", keypair(tmp_path / "ca")


def test_a_good_host_certificate_passes(tmp_path: Path, ca: tuple[Path, paramiko.PKey]) -> None:
    signer, authority = ca
    cert = hostcerts.parse(certificate(tmp_path, signer, "-h", "-n", "web1,10.0.0.1"))
    assert cert.principals == ("web1", "10.0.0.1") and cert.cert_type == hostcerts.HOST_CERT
    assert cert.valid_before == hostcerts.FOREVER
    hostcerts.check(cert, authority, ("10.0.0.1",))


@pytest.mark.parametrize("how, names, why", [
    (["-h", "-n", "web1"], ("web2",), "a certificate for web1, not for web2"),
    (["-n", "web1"], ("web1",), "a user certificate, not a host certificate"),
    (["-h", "-n", "web1", "-V", "20200101:20200102"], ("web1",), "a certificate that expired 2020-01-02"),
    (["-h", "-n", "web1", "-V", "+3650d:+3651d"], ("web1",), "a certificate not valid before "),
])
def test_what_ssh_refuses_is_refused_with_why(tmp_path: Path, ca: tuple[Path, paramiko.PKey], how: list[str],
                                              names: tuple[str, ...], why: str) -> None:
    signer, authority = ca
    with pytest.raises(hostcerts.BadCertificate, match=why):
        hostcerts.check(hostcerts.parse(certificate(tmp_path, signer, *how)), authority, names)


def test_another_authority_or_a_forged_signature_is_refused(tmp_path: Path, ca: tuple[Path, paramiko.PKey]) -> None:
    signer, authority = ca
    other = keypair(tmp_path / "other")
    blob = certificate(tmp_path, signer, "-h", "-n", "web1")
    with pytest.raises(hostcerts.BadCertificate, match="signed by another authority"):
        hostcerts.check(hostcerts.parse(blob), other, ("web1",))
    forged = hostcerts.parse(blob.replace(b"web1", b"web2"))  # the principal changed after signing
    with pytest.raises(hostcerts.BadCertificate, match="signature does not verify"):
        hostcerts.check(forged, authority, ("web2",))


def test_what_is_not_a_certificate_does_not_parse(tmp_path: Path, ca: tuple[Path, paramiko.PKey]) -> None:
    signer, _ = ca
    blob = certificate(tmp_path, signer, "-h", "-n", "web1")
    with pytest.raises(hostcerts.BadCertificate, match="cannot read"):
        hostcerts.parse(b"\0\0\0\x07ssh-foo")
    with pytest.raises(hostcerts.BadCertificate, match="cut short"):
        hostcerts.parse(blob[:120])  # no principals, no signature
    with pytest.raises(hostcerts.BadCertificate, match="bytes after its signature"):
        hostcerts.parse(blob + b"\0")


def test_known_hosts_judges_a_hosts_certificate_in_one_line(tmp_path: Path, ca: tuple[Path, paramiko.PKey]) -> None:
    """KnownHosts.verify on the key a host would offer: its certificate loaded on its plain key."""
    from corral.console.deploy.hostkeys import KnownHosts
    from corral.console.deploy.inventory import Host
    from corral.console.errors import DeployError

    signer, authority = ca
    certificate(tmp_path, signer, "-h", "-n", "web1", name="web1")
    host_key = paramiko.Ed25519Key(filename=str(tmp_path / "web1"))
    host_key.load_certificate(str(tmp_path / "web1-cert.pub"))
    known = tmp_path / "known_hosts"
    files = KnownHosts(tmp_path / "corral_known_hosts", [known])
    host = Host(alias="w", hostname="web1")
    ca_line = f"{authority.get_name()} {authority.get_base64()}"
    known.write_text(f"@cert-authority web* {ca_line}\n")
    assert files.trusts_authority(host) and files.verify(host, host_key) == str(known)
    with pytest.raises(DeployError, match="a certificate for web1, not for web9"):
        files.verify(Host(alias="w9", hostname="web9"), host_key)
    # The authority's line naming its key by another type: one line, not a traceback.
    known.write_text(f"@cert-authority web* ssh-rsa {authority.get_base64()}\n")
    with pytest.raises(DeployError, match=f"cannot read the authority's key at {known}:1"):
        files.verify(host, host_key)
