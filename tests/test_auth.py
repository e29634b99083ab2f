"""Authentication: only a valid token for the user's own id opens a stream; tokens never
reach the logs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from replicator.errors import ConfigError
from replicator.runtime.redact import RedactTokens
from replicator.web.auth import AuthError, TokenVerifier, mint_token
from tests.conftest import Database
from tests.service_support import SECRET, RunningService, running_service

#: Supabase's legacy service_role key: a role, an issuer, no subject, no audience
SERVICE_ROLE_KEY = jwt.encode(
    {
        "iss": "supabase",
        "ref": "abcdefghijklmnop",
        "role": "service_role",
        "iat": 1700000000,
        "exp": int(time.time()) + 10 * 365 * 86400,
    },
    SECRET,
    "HS256",
)

ALICE = str(uuid.UUID(int=11, version=4))


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": ALICE, "aud": "authenticated", "exp": now + 600, "iat": now, **overrides}


BAD_TOKENS = {
    "malformed": "not-a-jwt",
    "garbage segments": "a.b.c",
    "wrong signature": jwt.encode(_claims(), "another-secret-of-enough-length!!", "HS256"),
    "alg none": _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(_claims()) + ".",
    "expired": jwt.encode(_claims(exp=int(time.time()) - 3600), SECRET, "HS256"),
    "wrong audience": jwt.encode(_claims(aud="anon"), SECRET, "HS256"),
    "no subject": jwt.encode({k: v for k, v in _claims().items() if k != "sub"}, SECRET, "HS256"),
    "no expiry": jwt.encode({k: v for k, v in _claims().items() if k != "exp"}, SECRET, "HS256"),
    "HS512 algorithm": jwt.encode(_claims(), SECRET * 2, "HS512"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_verifier_refuses(case: str) -> None:
    verifier = TokenVerifier(secret=SECRET)
    with pytest.raises(AuthError):
        await verifier.verify(BAD_TOKENS[case])


@pytest.mark.anyio
async def test_verifier_accepts_supabase_style_tokens() -> None:
    verifier = TokenVerifier(secret=SECRET)
    claims = _claims(role="authenticated", is_anonymous=True)
    identity = await verifier.verify(jwt.encode(claims, SECRET, "HS256"))
    assert identity.user_id == ALICE
    assert not identity.admin
    assert identity.anonymous
    assert identity.expires == claims["exp"]
    assert (await verifier.verify(mint_token(SECRET, "x", admin=True))).admin


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.anyio
async def test_verifier_accepts_public_key_tokens() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    verifier = TokenVerifier(secret=None, public_key=_pem(key))
    assert (await verifier.verify(jwt.encode(_claims(), key, "ES256"))).user_id == ALICE
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AuthError, match="signature does not verify"):
        await verifier.verify(jwt.encode(_claims(), other, "ES256"))
    # Without a secret, HS256 is refused outright: the public key is never used as one.
    forged = _b64({"alg": "HS256", "typ": "JWT"}) + "." + _b64(_claims()) + ".c2ln"
    with pytest.raises(AuthError):
        await verifier.verify(forged)


@pytest.mark.anyio
async def test_algorithm_that_does_not_fit_the_pem_key_is_a_clean_refusal() -> None:
    """An ES256 token against an RSA key, or the RSA key used as an HMAC secret: 401s."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = _pem(rsa_key)
    verifier = TokenVerifier(secret=SECRET, public_key=pem)
    assert (await verifier.verify(jwt.encode(_claims(), rsa_key, "RS256"))).user_id == ALICE
    assert (await verifier.verify(jwt.encode(_claims(), rsa_key, "PS384"))).user_id == ALICE
    attacker = ec.generate_private_key(ec.SECP256R1())
    confused = _b64({"alg": "HS256", "typ": "JWT"}) + "." + _b64(_claims())
    mac = hmac.new(pem.encode(), confused.encode(), hashlib.sha256).digest()
    confused += "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    for token in (
        jwt.encode(_claims(), attacker, "ES256"),
        confused,
        _b64({"alg": "ES256"}) + "." + _b64(_claims()) + "." + _b64({"x": 1}),
        _b64({"alg": "RS256"}) + "." + _b64(_claims()) + ".AAAA",
        _b64({"alg": ["RS256"]}) + "." + _b64(_claims()) + ".AAAA",
        _b64({"alg": "RS256", "kid": 7}) + "." + _b64(_claims()) + ".AAAA",
    ):
        with pytest.raises(AuthError):
            await verifier.verify(token)


@pytest.mark.anyio
async def test_the_user_claim_is_configurable_and_compared_as_text() -> None:
    claims = _claims(
        app_metadata={"user_id": "42", "tenant": {"id": 7}},
        **{"https://app.example.com/user_id": "u-1", "https://app.example.com": {"x": "y"}},
    )
    token = jwt.encode(claims, SECRET, "HS256")
    cases = {
        "sub": ALICE,
        "app_metadata.user_id": "42",
        "app_metadata.tenant.id": "7",  # a JSON number: a bigint id's text form
        "https://app.example.com/user_id": "u-1",  # a name that holds dots
        "https://app.example.com.x": "y",
    }
    for claim, expected in cases.items():
        verifier = TokenVerifier(secret=SECRET, user_claim=claim)
        assert (await verifier.verify(token)).user_id == expected, claim
    for claim, message in [
        ("app_metadata.missing", "no 'app_metadata.missing' claim"),
        ("app_metadata", "claim 'app_metadata' is not a user id"),
        ("aud", "no 'aud' claim" if False else "claim 'aud' is not a user id"),
    ]:
        verifier = TokenVerifier(secret=SECRET, user_claim=claim, audience="")
        with pytest.raises(AuthError, match=message):
            await verifier.verify(jwt.encode({**claims, "aud": ["a", "b"]}, SECRET, "HS256"))


@pytest.mark.anyio
async def test_issuer_and_audience_checks() -> None:
    verifier = TokenVerifier(
        secret=SECRET, issuers=["https://ref.supabase.co/auth/v1"], audience="api,authenticated"
    )
    good = _claims(iss="https://ref.supabase.co/auth/v1")
    assert (await verifier.verify(jwt.encode(good, SECRET, "HS256"))).user_id == ALICE
    assert await verifier.verify(jwt.encode({**good, "aud": ["api", "x"]}, SECRET, "HS256"))
    with pytest.raises(AuthError, match="token issuer is not"):
        await verifier.verify(jwt.encode({**good, "iss": "https://evil"}, SECRET, "HS256"))
    with pytest.raises(AuthError, match="no 'iss' claim"):
        await verifier.verify(jwt.encode(_claims(), SECRET, "HS256"))
    with pytest.raises(AuthError, match="token audience is not 'api,authenticated'"):
        await verifier.verify(jwt.encode({**good, "aud": "anon"}, SECRET, "HS256"))
    # An empty audience setting checks none, whatever the token carries (Clerk has none).
    open_audience = TokenVerifier(secret=SECRET, audience="")
    for aud in ("anon", None):
        claims = {k: v for k, v in _claims(aud=aud).items() if v is not None}
        assert (await open_audience.verify(jwt.encode(claims, SECRET, "HS256"))).user_id == ALICE


@pytest.mark.anyio
async def test_service_role_key_opens_the_admin_check_only() -> None:
    verifier = TokenVerifier(secret=SECRET, issuers=["https://ref.supabase.co/auth/v1", "supabase"])
    identity = await verifier.verify_admin(SERVICE_ROLE_KEY)
    assert identity.admin and identity.user_id == ""
    # User routes still need an audience (when set) and the user claim.
    with pytest.raises(AuthError, match="no 'aud' claim"):
        await verifier.verify(SERVICE_ROLE_KEY)
    with pytest.raises(AuthError, match="no 'sub' claim"):
        await TokenVerifier(secret=SECRET, audience="").verify(SERVICE_ROLE_KEY)
    user = await verifier.verify_admin(
        mint_token(SECRET, ALICE, claims={"iss": "https://ref.supabase.co/auth/v1"})
    )
    assert not user.admin


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("GET /v1/badges/stream?access_token=eyJh.eyJz.sig HTTP/1.1", "access_token=[redacted]"),
        ("GET /s?a=1&access%5Ftoken=abc.def.ghi&b=2", "access%5Ftoken=[redacted]&b=2"),
        ("GET /s?ACCESS_TOKEN=abc", "ACCESS_TOKEN=[redacted]"),
        ("GET /s?acc%65ss%255Ftok%65n=abc", "acc%65ss%255Ftok%65n=[redacted]"),
        ("GET /s?ticket=WyJ1IiwxXQ.mac", "ticket=[redacted]"),
        ("GET /s?x=1;access_token=abc", ";access_token=[redacted]"),
        ("token in a path /v1/eyJhbGciOi.eyJzdWIi.c2ln/x", "/v1/[redacted]/x"),
    ],
)
def test_redaction_reads_parameter_names_decoded(text: str, redacted: str) -> None:
    out = RedactTokens.redact(text)
    assert redacted in out
    for secret in ("abc", "eyJh.eyJz.sig", "WyJ1IiwxXQ.mac", "c2ln"):
        assert secret not in out.replace("[redacted]", ""), out


def _get(service: RunningService, path: str, **kwargs: object) -> httpx.Response:
    return httpx.get(service.url + path, timeout=10, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/v1/badges/stream", "/v1/badges"])
def test_bad_tokens_get_401_json(database: Database, path: str) -> None:
    with running_service(database.dsn, database.slot) as service:
        for case, token in [("missing", None), *sorted(BAD_TOKENS.items())]:
            for via in ("header", "query", "cookie"):
                kwargs: dict[str, object] = {}
                if token is not None and via == "header":
                    kwargs["headers"] = {"Authorization": f"Bearer {token}"}
                elif token is not None and via == "query":
                    kwargs["params"] = {"access_token": token}
                elif token is not None:
                    kwargs["cookies"] = {"access_token": token}
                response = _get(service, path, **kwargs)
                assert response.status_code == 401, (case, via, response.text)
                assert response.headers["content-type"].startswith("application/json")
                body = response.json()
                assert body["error"] == "unauthorized" and body["message"], (case, via)
        response = _get(service, path, headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert response.status_code == 401
        if path == "/v1/badges":
            valid = {"Authorization": f"Bearer {service.token(ALICE)}"}
            assert _get(service, path, headers=valid).status_code == 200


def test_admin_route_needs_a_service_role_token(database: Database) -> None:
    with running_service(database.dsn, database.slot) as service:
        user = _get(
            service, "/v1/admin/badges", headers={"Authorization": f"Bearer {service.token(ALICE)}"}
        )
        assert user.status_code == 403
        admin = _get(
            service,
            "/v1/admin/badges",
            headers={"Authorization": f"Bearer {service.token('ops', admin=True)}"},
        )
        assert admin.status_code == 200
        assert "users" in admin.json()
        # Supabase's legacy service_role key: no sub, no aud.
        legacy = {"Authorization": f"Bearer {SERVICE_ROLE_KEY}"}
        assert _get(service, "/v1/admin/badges", headers=legacy).status_code == 200
        refused = _get(service, "/v1/badges", headers=legacy)
        assert refused.status_code == 401
        assert refused.json()["message"] == "token has no 'aud' claim"


def test_query_string_tokens_never_reach_the_logs(database: Database) -> None:
    with running_service(database.dsn, database.slot) as service:
        token = service.token(ALICE)
        with httpx.stream(
            "GET", service.url + "/v1/badges/stream", params={"access_token": token}, timeout=10
        ) as response:
            assert response.status_code == 200
            next(response.iter_lines())
        bad = BAD_TOKENS["wrong signature"]
        assert _get(service, "/v1/badges", params={"access_token": bad}).status_code == 401
        # Another spelling of the same parameter: the service reads it, so the log hides it.
        encoded = service.url + "/v1/badges?x=1&access%5Ftoken=" + token
        assert httpx.get(encoded, timeout=10).status_code == 200
        ticket = httpx.post(
            service.url + "/v1/badges/ticket",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        ).json()["ticket"]
        with httpx.stream(
            "GET", service.url + "/v1/badges/stream", params={"ticket": ticket}, timeout=10
        ) as response:
            assert response.status_code == 200
            next(response.iter_lines())
        # Wait until the access log has the last request's line.
        deadline = time.monotonic() + 10
        while "/v1/badges/stream?ticket=" not in service.log and time.monotonic() < deadline:
            time.sleep(0.05)
    log = service.log
    assert "/v1/badges/stream?access_token=[redacted]" in log
    assert "/v1/badges?x=1&access%5Ftoken=[redacted]" in log
    assert "/v1/badges/stream?ticket=[redacted]" in log
    assert token not in log
    assert bad not in log
    assert ticket not in log and ticket.split(".")[1] not in log


def test_unusable_public_keys_stop_start_up_with_one_line(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = weak.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    cases = {
        _pem(weak): "is an RSA key of 1024 bits (fewer than 2048)",
        private: "holds a private key; give its public key",
        "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----": "readable PEM",
        str(tmp_path / "missing.pem"): "is neither a PEM key nor a readable file",
    }
    for value, message in cases.items():
        with pytest.raises(ConfigError) as info:
            TokenVerifier(secret=None, public_key=value)
        assert str(info.value).startswith("REPLICATOR_JWT_PUBLIC_KEY") and message in str(
            info.value
        )
    key_file = tmp_path / "key.pem"
    key_file.write_text(_pem(ec.generate_private_key(ec.SECP384R1())))
    assert TokenVerifier(secret=None, public_key=str(key_file))
