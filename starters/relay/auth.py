"""Who is calling the relay: the bearer token's person (never a body field), or for the
codec, with OIDC configured, the Temporal UI's access token. A missing or invalid
credential is a 401, counted and logged (sampled), never audited: anyone can send those."""

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adapters.db import Principal, token_fingerprint
from adapters.oidc import AccessTokenVerifier, looks_like_jwt
from starters.actions.codec import oidc_principal
from starters.actions.front import Door

bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def principal(request: Request, creds: Credentials, door: Door) -> Principal:
    """The person behind the bearer token; 401 (counted, not audited) without a live one."""
    found = await door.store.access.authenticate(creds.credentials) if creds is not None else None
    if found is None:
        refusal = "missing bearer token" if creds is None else "invalid or revoked token"
        door.api_refusals.refused("api", refusal, f"{request.method} {request.url.path}",
                                  token_fingerprint(creds.credentials) if creds else None)
        raise HTTPException(401, refusal, headers={"WWW-Authenticate": "Bearer"})
    return found


Caller = Annotated[Principal, Depends(principal)]


async def codec_caller(request: Request, creds: Credentials, door: Door) -> Principal:
    """A relay API token (the CLI) or, with OIDC configured, the Temporal UI's access token."""
    oidc: AccessTokenVerifier | None = request.app.state.oidc
    if oidc is None or creds is None or not looks_like_jwt(creds.credentials):
        return await principal(request, creds, door)
    try:
        return await oidc_principal(oidc, door.store.access, creds.credentials)
    except HTTPException as exc:
        refusal = {401: "invalid access token", 403: "access token of an unlinked person"}.get(
            exc.status_code, "issuer keys unavailable")  # a fixed set: metric labels
        door.api_refusals.refused("temporal-ui", refusal, f"{request.method} {request.url.path}")
        raise


CodecCaller = Annotated[Principal, Depends(codec_caller)]
