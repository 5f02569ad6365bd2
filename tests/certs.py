"""Throwaway PKI for transport tests: a CA, and server/client certificates it signs."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    def __init__(self, name: str = "kimivl test CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str, *, server: bool) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM); server certificates name localhost and 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.DNSName(cn), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def write(self, directory: Path, cn: str, *, server: bool) -> tuple[Path, Path]:
        cert, key = self.issue(cn, server=server)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{cn}.crt").write_bytes(cert)
        (directory / f"{cn}.key").write_bytes(key)
        return directory / f"{cn}.crt", directory / f"{cn}.key"


class SecretVolume:
    """A directory laid out as the kubelet lays out a mounted Secret, and updated as it updates
    one: each version of the files in a timestamped directory, ``..data`` a symlink to the current
    one, each key a symlink through ``..data``; an update writes a new directory and renames a new
    ``..data`` link over the old one, so every file changes at once."""

    def __init__(self, directory: Path, files: dict[str, bytes]):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._version = 0
        self.update(files)
        for name in files:
            (self.dir / name).symlink_to(f"..data/{name}")

    def update(self, files: dict[str, bytes]) -> None:
        self._version += 1
        version = self.dir / f"..2026_12_01_00_00_00.{self._version}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        tmp = self.dir / "..data_tmp"
        tmp.symlink_to(version.name)
        tmp.replace(self.dir / "..data")

    def path(self, name: str) -> str:
        return str(self.dir / name)


def tls_secret(ca: CA, cert_and_key: tuple[bytes, bytes]) -> dict[str, bytes]:
    """A TLS Secret's entries under cert-manager's names: a (certificate, key) ``ca`` issued."""
    return {"tls.crt": cert_and_key[0], "tls.key": cert_and_key[1], "ca.crt": ca.pem}
