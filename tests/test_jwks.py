"""Keys from a JWKS on loopback: rotation, removal, outages, floods, every alg/key mismatch."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from replicator.errors import AuthError
from replicator.web.auth import TokenVerifier
from replicator.web.jwks import Jwks
from tests.conftest import Database
from tests.service_support import SECRET, open_stream, running_service

ALICE = str(uuid.UUID(int=41, version=4))
ISSUER = "https://issuer.test/"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass
class JwksServer:
    """A JWKS on 127.0.0.1: its keys can change, fail or hang; it counts requests."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "ok"  # ok | fail | hang
    requests: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                if server.mode == "hang":
                    server.release.wait(30)
                if server.mode == "fail":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"keys": server.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@contextmanager
def serving(server: JwksServer) -> Iterator[JwksServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), server.handler())
    httpd.daemon_threads = True
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}/.well-known/jwks.json"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        httpd.shutdown()
        httpd.server_close()


def public_jwk(key: PrivateKey, kid: str | None, **extra: str) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return {**jwk, **extra}


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": ALICE, "aud": "authenticated", "iat": now, "exp": now + 600, **overrides}


def sign(key: PrivateKey | bytes, alg: str, kid: str | None, **header: object) -> str:
    headers: dict[str, Any] = dict(header)
    if kid is not None:
        headers["kid"] = kid
    return jwt.encode(claims(), key, alg, headers=headers)  # type: ignore[arg-type]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_NEXT = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
#: what an attacker signs with, one key per algorithm family
ATTACKER = {
    "RS": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "ES384": ec.generate_private_key(ec.SECP384R1()),
    "ES512": ec.generate_private_key(ec.SECP521R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
}
ALGORITHMS = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
]  # fmt: skip


def attacker_token(alg: str, kid: str | None, victim: PrivateKey, **header: object) -> str:
    """A token with ``alg`` in its header, signed the way an attacker could for that alg:
    HMAC with the victim's public key (PEM and JWK text) as the secret, or the attacker's
    own key of that type."""
    if alg.startswith("HS"):
        pem = victim.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        headers = {"alg": alg, "typ": "JWT", **header}
        if kid is not None:
            headers["kid"] = kid
        signing_input = b64(json.dumps(headers).encode()) + "." + b64(json.dumps(claims()).encode())
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        mac = hmac.new(pem, signing_input.encode(), digest).digest()
        return signing_input + "." + b64(mac)
    key = ATTACKER["RS" if alg[:2] in ("RS", "PS") else alg]
    return sign(key, alg, kid, **header)


@asynccontextmanager
async def running(jwks: Jwks) -> AsyncIterator[Jwks]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(jwks.run)
        yield jwks
        tg.cancel_scope.cancel()


async def until(condition: Any, timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


pytestmark = pytest.mark.anyio


async def test_es256_and_rs256_keys_and_what_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    server = JwksServer(
        keys=[
            public_jwk(EC_KEY, "ec-1"),
            public_jwk(RSA_KEY, "rsa-1", alg="RS256", use="sig"),
            public_jwk(ED_KEY, "ed-1"),
            {"kty": "oct", "kid": "shared", "k": b64(b"a" * 32)},
            public_jwk(RSA_NEXT, "enc-1", use="enc"),
            public_jwk(EC384_KEY, "odd", alg="RS256"),
        ]
    )
    with serving(server), caplog.at_level(logging.INFO, "replicator.web.jwks"):
        async with running(Jwks(server.url)) as jwks:
            verifier = TokenVerifier(secret=None, jwks=jwks)
            for key, alg, kid in [
                (EC_KEY, "ES256", "ec-1"),
                (RSA_KEY, "RS256", "rsa-1"),
                (ED_KEY, "EdDSA", "ed-1"),
            ]:
                identity = await verifier.verify(sign(key, alg, kid))
                assert identity.user_id == ALICE
            # The key names RS256: another RSA algorithm is refused with it.
            with pytest.raises(AuthError, match="does not match key 'rsa-1'"):
                await verifier.verify(sign(RSA_KEY, "PS256", "rsa-1"))
            # Skipped keys are never used, whatever a token claims.
            hs = jwt.encode(claims(), b"a" * 32, "HS256", headers={"kid": "shared"})
            for token in (hs, sign(RSA_NEXT, "RS256", "enc-1"), sign(EC384_KEY, "ES384", "odd")):
                with pytest.raises(AuthError):
                    await verifier.verify(token)
    assert sorted(jwks.by_kid) == ["ec-1", "ed-1", "rsa-1"]
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(ignored) == 3, ignored


async def test_every_algorithm_that_does_not_fit_its_key_is_refused() -> None:
    victims = {"rsa": RSA_KEY, "ec256": EC_KEY, "ec384": EC384_KEY, "ed": ED_KEY}
    fits = {"rsa": {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}, "ec256": {"ES256"}}
    fits |= {"ec384": {"ES384"}, "ed": {"EdDSA"}}
    server = JwksServer(keys=[public_jwk(key, kid) for kid, key in victims.items()])
    with serving(server):
        async with running(Jwks(server.url)) as jwks:
            verifier = TokenVerifier(secret=None, jwks=jwks)
            refused = accepted = 0
            for kid, victim in victims.items():
                for alg in ALGORITHMS:
                    for token_kid in (kid, None):
                        if alg in fits[kid]:
                            # The sanity half: the right key and algorithm pass.
                            assert await verifier.verify(sign(victim, alg, token_kid))
                            accepted += 1
                            continue
                        token = attacker_token(alg, token_kid, victim)
                        with pytest.raises(AuthError):
                            await verifier.verify(token)
                        refused += 1
                none = b64(b'{"alg":"none"}') + "." + b64(json.dumps(claims()).encode()) + "."
                with pytest.raises(AuthError):
                    await verifier.verify(none)
    assert accepted == 2 * 9 and refused == 2 * (4 * 13 - 9)


async def test_rotation_adds_keys_at_once_and_removal_takes_effect() -> None:
    server = JwksServer(keys=[public_jwk(RSA_KEY, "2024")])
    with serving(server):
        jwks = Jwks(server.url, refresh_s=0.2, cooldown_s=0.0)
        async with running(jwks):
            verifier = TokenVerifier(secret=None, jwks=jwks)
            old = sign(RSA_KEY, "RS256", "2024")
            assert await verifier.verify(old)
            # The provider starts signing with a new key: its first token fetches it.
            server.keys = [public_jwk(RSA_KEY, "2024"), public_jwk(EC_KEY, "2025")]
            assert (await verifier.verify(sign(EC_KEY, "ES256", "2025"))).user_id == ALICE
            assert "2025" in jwks.by_kid
            # The old key is withdrawn: after the next refresh its tokens are refused.
            server.keys = [public_jwk(EC_KEY, "2025")]
            await until(lambda: "2024" not in jwks.by_kid)
            with pytest.raises(AuthError, match="token key id '2024' is not known"):
                await verifier.verify(old)
            assert await verifier.verify(sign(EC_KEY, "ES256", "2025"))


async def test_a_flood_of_unknown_key_ids_fetches_once_per_cooldown() -> None:
    server = JwksServer(keys=[public_jwk(EC_KEY, "real")])
    now = [1000.0]
    with serving(server):
        jwks = Jwks(server.url, cooldown_s=60, clock=lambda: now[0])
        async with running(jwks):
            verifier = TokenVerifier(secret=None, jwks=jwks)
            assert await verifier.verify(sign(EC_KEY, "ES256", "real"))
            assert server.requests == 1

            async def flood(count: int) -> list[str]:
                errors: list[str] = []

                async def forged(i: int) -> None:
                    try:
                        await verifier.verify(sign(ATTACKER["ES256"], "ES256", f"forged-{i}"))
                    except AuthError as exc:
                        errors.append(str(exc))

                async with anyio.create_task_group() as tg:
                    for i in range(count):
                        tg.start_soon(forged, i)
                return errors

            # Within the cooldown of the start-up fetch: refused without asking.
            errors = await flood(100)
            assert len(errors) == 100 and all("is not known" in e for e in errors)
            assert server.requests == 1
            # A cooldown later: the whole flood shares one fetch.
            for expected in (2, 3):
                now[0] += 61
                errors = await flood(200)
                assert len(errors) == 200 and all("is not known" in e for e in errors)
                assert server.requests == expected
            # The known key keeps working, with no fetch.
            assert await verifier.verify(sign(EC_KEY, "ES256", "real"))
            assert server.requests == 3


async def test_an_unreachable_jwks_keeps_known_keys_and_logs_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = JwksServer(keys=[public_jwk(EC_KEY, "k1")])
    with serving(server), caplog.at_level(logging.INFO, "replicator.web.jwks"):
        jwks = Jwks(server.url, refresh_s=0.05, cooldown_s=0.01, log_interval_s=3600)
        async with running(jwks):
            verifier = TokenVerifier(secret=None, jwks=jwks)
            await until(lambda: jwks.loaded)
            server.mode = "fail"
            await until(lambda: jwks.failures >= 5)
            assert (await verifier.verify(sign(EC_KEY, "ES256", "k1"))).user_id == ALICE
            server.mode = "ok"
            await until(lambda: any("reachable again" in r.getMessage() for r in caplog.records))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0] == (
        f"cannot fetch the JWKS at {server.url} (HTTP 500); the keys already known (1) keep"
        " working, retrying"
    )


async def test_fetching_never_blocks_the_event_loop() -> None:
    server = JwksServer(keys=[public_jwk(EC_KEY, "slow")], mode="hang")
    with serving(server):
        async with running(Jwks(server.url)) as jwks:
            verifier = TokenVerifier(secret=SECRET, jwks=jwks)
            results: list[str] = []

            async def waiting() -> None:
                results.append((await verifier.verify(sign(EC_KEY, "ES256", "slow"))).user_id)

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiting)
                await until(lambda: server.requests >= 1)  # the fetch is in progress...
                hs256 = jwt.encode(claims(), SECRET, "HS256")
                for _ in range(50):  # ...and the loop keeps serving other tokens
                    assert (await verifier.verify(hs256)).user_id == ALICE
                assert results == []
                server.mode = "ok"
                server.release.set()
            assert results == [ALICE]


async def test_keys_and_urls_in_a_token_header_are_ignored() -> None:
    server = JwksServer(keys=[public_jwk(EC_KEY, "real")])
    rogue = JwksServer(keys=[public_jwk(ATTACKER["ES256"], "rogue")])
    with serving(server), serving(rogue):
        async with running(Jwks(server.url, cooldown_s=3600)) as jwks:
            verifier = TokenVerifier(secret=None, jwks=jwks)
            assert await verifier.verify(sign(EC_KEY, "ES256", "real"))
            embedded = public_jwk(ATTACKER["ES256"], None)
            for kid in ("real", "rogue", None):
                token = sign(
                    ATTACKER["ES256"],
                    "ES256",
                    kid,
                    jku=rogue.url,
                    x5u=rogue.url,
                    jwk=embedded,
                    x5c=["MIIB"],
                )
                with pytest.raises(AuthError):
                    await verifier.verify(token)
    assert rogue.requests == 0


def _env(**extra: str) -> dict[str, str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REPLICATOR_") and k != "DATABASE_URL"
    }
    return {**environ, **extra}


def test_the_service_with_a_jwks_and_no_secret(database: Database) -> None:
    """Auth0 / Clerk / Keycloak shape: a JWKS, an issuer, the user in a nested claim."""
    server = JwksServer(keys=[public_jwk(EC_KEY, "ec"), public_jwk(RSA_KEY, "rsa")])
    env = {
        "REPLICATOR_JWT_SECRET": "",
        "REPLICATOR_JWT_ISSUER": ISSUER,
        "REPLICATOR_JWT_AUDIENCE": "https://badges.test",
        "REPLICATOR_JWT_USER_CLAIM": "app_metadata.user_id",
    }

    def token(key: PrivateKey, alg: str, kid: str, **extra: object) -> str:
        body = claims(sub="auth0|abc", iss=ISSUER, aud="https://badges.test", **extra) | {
            "app_metadata": {"user_id": ALICE}
        }
        return jwt.encode(body, key, alg, headers={"kid": kid})

    with serving(server):
        env["REPLICATOR_JWKS_URL"] = server.url
        with running_service(database.dsn, database.slot, env=env) as service:

            async def stream_first() -> dict[str, Any]:
                async with open_stream(service.url, token(EC_KEY, "ES256", "ec")) as stream:
                    return (await stream.next_badges()).data  # type: ignore[no-any-return]

            assert anyio.run(stream_first)["user_id"] == ALICE
            headers = {"Authorization": f"Bearer {token(RSA_KEY, 'RS256', 'rsa')}"}
            answer = httpx.get(service.url + "/v1/badges", headers=headers, timeout=10)
            assert answer.status_code == 200 and answer.json()["user_id"] == ALICE
            # The reported 500: an ES256 header against an RSA key.
            mismatched = attacker_token("ES256", "rsa", RSA_KEY)
            for bad in (mismatched, attacker_token("HS256", "rsa", RSA_KEY)):
                answer = httpx.get(
                    service.url + "/v1/badges", headers={"Authorization": f"Bearer {bad}"}
                )
                assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"

            # verify takes a service_role token from the provider instead of signing one.
            admin = token(RSA_KEY, "RS256", "rsa", role="service_role")
            verify = [sys.executable, "-m", "replicator", "verify", "--url", service.url]
            database_url = {"DATABASE_URL": database.dsn}
            done = subprocess.run(
                [*verify, "--token", admin],
                env=_env(**database_url),
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert "agrees with the database" in done.stdout
            by_env = subprocess.run(
                verify,
                env=_env(**database_url, REPLICATOR_ADMIN_TOKEN=admin),
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert by_env.returncode == 0, by_env.stdout + by_env.stderr
            neither = subprocess.run(
                verify, env=_env(**database_url), capture_output=True, text=True, timeout=240
            )
            assert neither.returncode == 2
            assert neither.stderr.strip().splitlines() == [
                "replicator: REPLICATOR_JWT_SECRET is not set; it is needed to sign a token"
                " (verify can use a service_role token from your auth server instead: --token"
                " or REPLICATOR_ADMIN_TOKEN)"
            ]
    assert "Traceback" not in service.log
