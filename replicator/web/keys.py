"""Verification keys and the algorithms each accepts, worked out once from the key's type."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from replicator.errors import ConfigError, UnusableKey

logger = logging.getLogger(__name__)

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
#: RSA keys shorter than this are refused: they can be factored
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class Key:
    """One key: what verifies with it, and the only algorithms a token may use with it."""

    key: Any
    algorithms: frozenset[str]
    #: where it came from, for messages: "REPLICATOR_JWT_SECRET", "JWKS key 'abc'", ...
    name: str
    kid: str | None = None


def algorithms_of(public: object) -> frozenset[str]:
    """The signature algorithms a public key can verify, by its type alone."""
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise UnusableKey(f"an RSA key of {public.key_size} bits (fewer than {MIN_RSA_BITS})")
        return RSA_ALGORITHMS
    if isinstance(public, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHMS.get(public.curve.name)
        if alg is None:
            raise UnusableKey(f"an EC key on curve {public.curve.name}, which is not supported")
        return frozenset({alg})
    if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    raise UnusableKey(f"a {type(public).__name__}, which cannot verify tokens")


def secret_key(secret: str) -> Key:
    return Key(secret.encode(), frozenset({"HS256"}), "REPLICATOR_JWT_SECRET")


def load_public_key(value: str) -> Key:
    """A PEM public key or certificate given inline, or the path of a file that holds one."""
    name = "REPLICATOR_JWT_PUBLIC_KEY"
    if "-----BEGIN" in value:
        text = value
    else:
        try:
            text = Path(value).expanduser().read_text()
        except (OSError, UnicodeDecodeError):
            raise ConfigError(
                f"{name}={value!r} is neither a PEM key nor a readable file"
            ) from None
    if "PRIVATE KEY-----" in text:
        raise ConfigError(f"{name} holds a private key; give its public key")
    try:
        if "-----BEGIN CERTIFICATE-----" in text:
            public: Any = x509.load_pem_x509_certificate(text.encode()).public_key()
        else:
            public = load_pem_public_key(text.encode())
        return Key(public, algorithms_of(public), name)
    except UnusableKey as exc:
        raise ConfigError(f"{name} is {exc}") from None
    except ValueError:
        raise ConfigError(f"{name} does not hold a readable PEM public key") from None


def parse_jwks(body: bytes) -> tuple[list[Key], list[str]]:
    """The signing keys of a JWKS document, and a line for each key skipped.

    Symmetric (``oct``) keys and encryption keys are never used: a published JWKS that holds a
    shared secret would let anyone sign tokens.
    """
    document = json.loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS document (no "keys" list)')
    keys: list[Key] = []
    skipped: list[str] = []
    for index, jwk in enumerate(document["keys"]):
        if not isinstance(jwk, dict):
            skipped.append(f"entry {index} is not an object")
            continue
        kid = jwk.get("kid")
        label = f"key {kid!r}" if isinstance(kid, str) else f"key #{index}"
        if kid is not None and not isinstance(kid, str):
            skipped.append(f"{label}: kid is not a string")
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("kty") == "oct":
            skipped.append(f"{label}: not a public signing key")
            continue
        try:
            public = jwt.PyJWK(jwk).key
            algorithms = algorithms_of(public)
        except UnusableKey as exc:
            skipped.append(f"{label}: {exc}")
            continue
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            skipped.append(f"{label}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        declared = jwk.get("alg")
        if declared is not None:
            # A key that names its algorithm is used with that one only.
            if declared not in algorithms:
                skipped.append(f"{label}: alg {str(declared)[:16]!r} does not fit the key")
                continue
            algorithms = frozenset({declared})
        keys.append(Key(public, algorithms, f"JWKS {label}", kid))
    return keys, skipped
