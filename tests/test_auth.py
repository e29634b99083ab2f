"""Authentication: only a valid token for the user's own id opens a stream."""

from __future__ import annotations

import base64
import json
import time
import uuid

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from replicator.web.auth import AuthError, TokenVerifier, mint_token
from tests.conftest import Database
from tests.service_support import SECRET, RunningService, running_service

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


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_verifier_refuses(case: str) -> None:
    verifier = TokenVerifier(secret=SECRET)
    with pytest.raises(AuthError):
        verifier.verify(BAD_TOKENS[case])


def test_verifier_accepts_supabase_style_tokens() -> None:
    verifier = TokenVerifier(secret=SECRET)
    identity = verifier.verify(jwt.encode(_claims(role="authenticated"), SECRET, "HS256"))
    assert identity.user_id == ALICE
    assert not identity.admin
    assert verifier.verify(mint_token(SECRET, "x", admin=True)).admin


def test_verifier_accepts_public_key_tokens() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    verifier = TokenVerifier(secret=None, public_key=public)
    assert verifier.verify(jwt.encode(_claims(), key, "ES256")).user_id == ALICE
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AuthError):
        verifier.verify(jwt.encode(_claims(), other, "ES256"))
    # Without a secret, HS256 is refused outright: the public key is never used as one.
    forged = _b64({"alg": "HS256", "typ": "JWT"}) + "." + _b64(_claims()) + ".c2ln"
    with pytest.raises(AuthError):
        verifier.verify(forged)


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
    # stopping the service joined its log reader: the log is whole
    log = service.log
    assert "/v1/badges/stream?access_token=[redacted]" in log
    assert token not in log
    assert bad not in log
