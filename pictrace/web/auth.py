"""Who may write: a bearer token compared in constant time. Reads need nothing.

With no ``PICTRACE_API_TOKEN`` configured, writes are off (403, saying how to turn them on) rather than open:
a service put on the internet with its defaults must not let strangers change the gallery.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pictrace.errors import AuthError, WritesDisabledError

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiToken",
    description="`Authorization: Bearer <PICTRACE_API_TOKEN>`; write routes only.",
)


def check_token(configured: str | None, presented: str | None) -> None:
    """Raise unless ``presented`` is the configured token. Both are hashed first so the compare is
    constant-time in length too (``hmac.compare_digest`` returns early on a length mismatch)."""
    if not configured:
        raise WritesDisabledError(
            "writes through the API are disabled: set PICTRACE_API_TOKEN on the server to enable them, "
            "then send 'Authorization: Bearer <token>'"
        )
    if not presented:
        raise AuthError("this route needs an 'Authorization: Bearer <token>' header")
    expected = hashlib.sha256(configured.encode()).digest()
    if not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), expected):
        raise AuthError("wrong API token")


async def require_writer(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Route dependency: runs before the handler reads the body, so strangers cannot make us read uploads."""
    check_token(request.app.state.settings.api_token, credentials.credentials if credentials else None)
