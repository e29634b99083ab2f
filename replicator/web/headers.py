"""Security headers on every response: a Content-Security-Policy, nosniff, no referrer.

Nothing the service serves may be framed (``frame-ancestors 'none'``), guessed into another
type, or leak its URL (which may carry a ticket) in a Referer. The demo page runs only its
own files: no inline script or style, and connections to its own origin only. Badge streams
carry the same headers from ``stream.RAW_HEADERS`` and pass through here untouched, so an
open stream costs no extra frame for this.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: a page of the demo: its own scripts, styles, workers and connections only
PAGE_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    b" worker-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none';"
    b" frame-ancestors 'none'"
)
#: a script may also run as the shared worker of a page of this origin: it connects home
SCRIPT_POLICY = b"default-src 'none'; connect-src 'self'; frame-ancestors 'none'"
#: anything else (JSON, text, events) is data, never a document
DATA_POLICY = b"default-src 'none'; frame-ancestors 'none'"

COMMON: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
#: for raw responses built elsewhere (badge streams)
DATA_HEADERS: list[tuple[bytes, bytes]] = [(b"content-security-policy", DATA_POLICY), *COMMON]


def policy_for(content_type: bytes) -> bytes:
    kind = content_type.split(b";", 1)[0].strip().lower()
    if kind == b"text/html":
        return PAGE_POLICY
    if kind == b"text/javascript":
        return SCRIPT_POLICY
    return DATA_POLICY


def with_security(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` and the security headers they lack."""
    found = list(headers)
    names = {name.lower() for name, _ in found}
    if b"content-security-policy" not in names:
        content_type = next((v for n, v in found if n.lower() == b"content-type"), b"")
        found.append((b"content-security-policy", policy_for(content_type)))
    found.extend(item for item in COMMON if item[0] not in names)
    return found


class SecurityHeaders:
    """Adds the security headers a response lacks, its policy chosen by its content type."""

    def __init__(self, app: ASGIApp, *, skip: tuple[str, ...] = ()) -> None:
        self.app = app
        #: paths whose responses carry the headers themselves
        self.skip = frozenset(skip)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.skip:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": with_security(message.get("headers", ()))}
            await send(message)

        await self.app(scope, receive, send_with_headers)
