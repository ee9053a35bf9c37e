"""The federation's credentials: a CA, the SuperLink's TLS certificate and one SuperNode key pair per site.

Layout of a credentials folder (:class:`CredentialPaths`; folders 0700, private keys 0600, the rest 0644)::

    DIR/ca.crt, DIR/ca.key                    the CA (PEM, EC P-384): signs the SuperLink's certificate
    DIR/superlink.crt, DIR/superlink.key      the SuperLink's TLS certificate (PEM; SANs = every host given)
    DIR/sites/NAME/supernode.key              the site's node-authentication key (OpenSSH, EC P-384)
    DIR/sites/NAME/supernode.pub              its public key (OpenSSH), registered with ``flwr supernode register``

Which files go where: ``ca.crt`` to everyone (SuperNodes verify the SuperLink with it, ``flwr`` too); ``ca.key``
stays with whoever makes credentials (offline is best); ``superlink.*`` to the coordinator; ``sites/NAME/`` to
hospital NAME (its ``supernode.pub`` also to the coordinator, which registers it).

Formats are Flower 1.42's: ``flower-supernode --auth-supernode-private-key`` reads an OpenSSH private key that must
be an elliptic-curve key (``load_ssh_private_key``, ``ec.EllipticCurvePrivateKey``) and ``flwr supernode register``
an OpenSSH public key on a NIST curve (``load_ssh_public_key``, ``uses_nist_ec_curve``). The SuperLink's
certificate and key go to uvicorn/gRPC as PEM files (``--ssl-certfile``, ``--ssl-keyfile``, ``--ssl-ca-certfile``).
Keys and certificates are made with ``cryptography``, never by shelling out to openssl.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_models.atomic import atomic_write
from shared_models.errors import ExplainedError

#: Days a certificate stays valid unless told otherwise (825: the longest most TLS clients accept for a server).
DEFAULT_DAYS = 825
#: One curve for every key: Flower's node authentication accepts any NIST curve, and P-384 is the one its docs use.
CURVE = ec.SECP384R1
PRIVATE, PUBLIC, FOLDER = 0o600, 0o644, 0o700
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CredentialsError(ExplainedError, ValueError):
    """A credentials folder, file or argument that cannot be used (names the path and what to do)."""


class CredentialsExistError(CredentialsError, FileExistsError):
    """Credentials would overwrite files that exist (``--force`` replaces them)."""


@dataclass(frozen=True)
class CredentialPaths:
    """Where each credential lives under ``root`` (see the module docstring for the layout)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def superlink_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.root / "superlink.key"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / check_site_name(site)

    def site_private_key(self, site: str) -> Path:
        return self.site_dir(site) / "supernode.key"

    def site_public_key(self, site: str) -> Path:
        return self.site_dir(site) / "supernode.pub"

    def sites(self) -> list[str]:
        """The sites that have a key pair here, sorted by name."""
        folder = self.root / "sites"
        return sorted(p.parent.name for p in folder.glob("*/supernode.key")) if folder.is_dir() else []

    def require(self, *paths: Path) -> None:
        """Raise :class:`CredentialsError` naming the first of ``paths`` that is not a file."""
        for path in paths:
            if not path.is_file():
                raise CredentialsError(
                    path, "missing",
                    f"Make the credentials first: fedsr deploy credentials {self.root} --host HOST --site NAME "
                    "(or point --credentials at the folder that holds them)")


@dataclass(frozen=True)
class WrittenCredentials:
    """What :func:`write_credentials` wrote: every file, and those of them that replaced an existing file."""

    paths: CredentialPaths
    written: tuple[Path, ...]
    replaced: tuple[Path, ...]


def check_site_name(site: str) -> str:
    """``site`` if it can name a folder (letters, digits, ``.``, ``_``, ``-``; not starting with a dot), else raise."""
    if not _SITE_NAME.match(site):
        raise CredentialsError(site, "not a usable site name",
                               "Use letters, digits, '.', '_' and '-' only, starting with a letter or digit")
    return site


def subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """One SAN per host: an ``IPAddress`` for an IPv4/IPv6 literal, a ``DNSName`` for anything else."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:@" for c in host):
                raise CredentialsError(host, "not a host name or IP address",
                                       "Give --host as the name or address sites use to reach the SuperLink, "
                                       "without port or scheme (e.g. coordinator.example.org, 10.0.0.5)") from None
            names.append(x509.DNSName(host))
    return names


def write_credentials(directory: Path, hosts: Sequence[str], sites: Sequence[str], *, days: int = DEFAULT_DAYS,
                      force: bool = False) -> WrittenCredentials:
    """Make a CA, the SuperLink's certificate for ``hosts`` and a key pair for each of ``sites`` under ``directory``.

    ``days``: validity of both certificates. Nothing is written when any target exists and ``force`` is false
    (:class:`CredentialsExistError` lists them); with ``force`` they are replaced, each atomically.
    """
    if not hosts:
        raise CredentialsError(directory, "no --host given",
                               "Name every host name and IP address sites use to reach the SuperLink (--host, repeatable)")
    if days < 1:
        raise CredentialsError(directory, f"--days {days} is not a positive number of days", "Use e.g. --days 825")
    if len(set(sites)) != len(sites):
        raise CredentialsError(directory, "a site is named twice", "Give each --site once")
    paths = CredentialPaths(Path(directory))
    sans = subject_alternative_names(hosts)
    targets = [paths.ca_cert, paths.ca_key, paths.superlink_cert, paths.superlink_key,
               *(p for site in sites for p in (paths.site_private_key(site), paths.site_public_key(site)))]
    existing = tuple(p for p in targets if p.exists())
    if existing and not force:
        raise CredentialsExistError(
            existing[0], f"exists ({len(existing)} of the files to write exist: "
                         + ", ".join(str(p.relative_to(paths.root)) for p in existing) + ")",
            "Nothing was written. Use another folder, or --force to replace them (sites must then get their new "
            "keys and certificates, and be registered again)")

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsr federation CA")])
    ca_cert = (_certificate(ca_name, ca_name, ca_key.public_key(), now, days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))
    link_key = ec.generate_private_key(CURVE())
    link_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    link_cert = (_certificate(link_name, ca_name, link_key.public_key(), now, days)
                 .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                 .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                critical=False)
                 .sign(ca_key, hashes.SHA384()))

    _make_folder(paths.root)
    contents: list[tuple[Path, bytes, int]] = [
        (paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC),
        (paths.ca_key, _pem_private(ca_key), PRIVATE),
        (paths.superlink_cert, link_cert.public_bytes(serialization.Encoding.PEM), PUBLIC),
        (paths.superlink_key, _pem_private(link_key), PRIVATE),
    ]
    if sites:
        _make_folder(paths.root / "sites")
    for site in sites:
        _make_folder(paths.site_dir(site))
        node_key = ec.generate_private_key(CURVE())
        contents.append((paths.site_private_key(site), node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), PRIVATE))
        contents.append((paths.site_public_key(site), node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" fedsr-{site}\n".encode(), PUBLIC))
    for path, data, mode in contents:
        write_file(path, data, mode)
    return WrittenCredentials(paths, tuple(p for p, _, _ in contents), existing)


def write_file(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to ``path`` atomically with permissions ``mode`` (set before the file appears)."""

    def write(handle):  # the temporary file gets ``mode`` before it is renamed over ``path``
        os.fchmod(handle.fileno(), mode)
        handle.write(data)

    return atomic_write(path, write)


def _make_folder(folder: Path) -> None:
    """Create ``folder`` owner-only (0700); an existing folder is left as it is."""
    if not folder.exists():
        folder.mkdir(parents=True)
        folder.chmod(FOLDER)  # not mkdir's mode: the umask filters that one


def _certificate(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: dt.datetime,
                 days: int) -> x509.CertificateBuilder:
    """A certificate without extensions yet: the caller adds them and signs."""
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate clocks a little behind
            .not_valid_after(now + dt.timedelta(days=days)))


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificate_hosts(path: Path) -> list[str]:
    """The host names and IP addresses a PEM certificate's subject alternative names cover, in its order."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as error:
        raise CredentialsError(path, f"not a certificate with host names ({error})",
                               "Make it with fedsr deploy credentials DIR --host HOST") from None
    return [str(name.value) for name in sans]


def check_private(path: Path) -> Path:
    """``path`` if it is a file that only its owner may read or write; else raise with the fix (like ssh does)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CredentialsError(path, f"a private key readable by others (mode {mode:o})", f"Run: chmod 600 {path}")
    return path
