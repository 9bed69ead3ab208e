"""The Temporal UI's OIDC access token, as a production UI passes it to the codec endpoint
(`TEMPORAL_CODEC_PASS_ACCESS_TOKEN`): a JWT checked with PyJWT against the issuer's published
keys (JWKS), its issuer, audience and expiry, naming a person by one configured claim.

Who that person is in the product (and so their roles) is the caller's business: the relay
looks the claim up among identity links (`refunds integrations link --oidc`).
"""

import asyncio
from dataclasses import dataclass

import jwt

from adapters.config import Settings

LEEWAY_SECONDS = 30
"""Clock skew tolerated between the issuer and us on `exp`, `nbf` and `iat`."""


class InvalidAccessToken(Exception):
    """The token is not one of the issuer's for us (bad signature, expired, wrong issuer or
    audience, claim missing): the caller is not authenticated."""


class KeysUnavailable(Exception):
    """The issuer's keys could not be fetched: nobody can be authenticated right now."""


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts; the relay API tokens the product makes (`rfo_` and URL-safe
    base64) never contain a dot, so a token is checked one way only."""
    return token.count(".") == 2


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    audience: str
    jwks_url: str
    user_claim: str
    algorithms: tuple[str, ...]


REFETCH_COOLDOWN_SECONDS = 30.0
"""At most one fetch of the issuer's keys per this many seconds for tokens naming a key id
not in the cached set: anyone can send such a token, and each must not cost a fetch."""


class AccessTokenVerifier:
    """Checks access tokens of one issuer; the keys are fetched once and cached (PyJWKClient
    refetches when a token names a key id it has not seen, as after a key rotation, at most
    once per `REFETCH_COOLDOWN_SECONDS`)."""

    def __init__(self, oidc: OidcSettings, *, jwks_timeout: float = 5) -> None:
        self.settings = oidc
        self._keys = jwt.PyJWKClient(oidc.jwks_url, cache_keys=True, timeout=jwks_timeout,
                                     cooldown_duration=REFETCH_COOLDOWN_SECONDS)

    @classmethod
    def from_settings(cls, settings: Settings) -> "AccessTokenVerifier | None":
        """None unless REFUNDS_OIDC_ISSUER is set (the settings check the rest is too)."""
        if settings.oidc_issuer is None:
            return None
        assert settings.oidc_audience is not None and settings.oidc_jwks_url is not None
        return cls(OidcSettings(issuer=settings.oidc_issuer, audience=settings.oidc_audience,
                                jwks_url=settings.oidc_jwks_url, user_claim=settings.oidc_user_claim,
                                algorithms=tuple(settings.oidc_algorithms)))

    async def subject(self, token: str) -> str:
        """The value of the user claim of a valid token; InvalidAccessToken says why not."""
        try:  # PyJWKClient fetches with urllib: off the event loop
            key = await asyncio.to_thread(self._keys.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientConnectionError as exc:
            raise KeysUnavailable(f"cannot fetch the issuer's keys: {exc}") from None
        except jwt.PyJWTError as exc:
            raise InvalidAccessToken(str(exc)) from None
        claim = self.settings.user_claim
        try:
            claims = jwt.decode(token, key, algorithms=list(self.settings.algorithms),
                                audience=self.settings.audience, issuer=self.settings.issuer,
                                leeway=LEEWAY_SECONDS, options={"require": ["exp", "iss", "aud", claim]})
        except jwt.PyJWTError as exc:
            raise InvalidAccessToken(str(exc)) from None
        value = claims[claim]
        if not isinstance(value, str) or not value:
            raise InvalidAccessToken(f"claim {claim!r} is not a non-empty string")
        if claim == "email" and claims.get("email_verified") is not True:
            # where people may edit their address, an unverified one names whoever typed it
            raise InvalidAccessToken("the token's email is not verified by the issuer (email_verified)")
        return value
