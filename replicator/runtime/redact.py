"""A logging filter that keeps tokens and tickets out of every log line."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus


class RedactTokens(logging.Filter):
    """Keeps tokens and tickets out of logs.

    A query parameter whose name, once percent-decoded, holds ``token`` or ``ticket`` in any
    case (``access_token``, ``access%5Ftoken``, ``ACCESS_TOKEN``, ``ticket``) has its value
    replaced by ``[redacted]``; so has anything shaped like a JWT, wherever it appears.
    """

    _param = re.compile(r"([?&;])([^=&;?#\s\"]*)=([^&;#\s\"]*)")
    _jwt = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*")

    @staticmethod
    def _secret_name(raw: str) -> bool:
        name = raw
        for _ in range(3):  # names encoded more than once, too
            decoded = unquote_plus(name)
            if decoded == name:
                break
            name = decoded
        name = name.lower()
        return "token" in name or "ticket" in name

    @classmethod
    def redact(cls, text: str) -> str:
        if "=" in text:
            text = cls._param.sub(
                lambda m: f"{m[1]}{m[2]}=[redacted]" if cls._secret_name(m[2]) else m[0], text
            )
        return cls._jwt.sub("[redacted]", text) if "eyJ" in text else text

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        return True
