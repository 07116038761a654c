"""In-memory signing keys and revocations for verifier tests (no auth service needed)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ISSUER, AUDIENCE = "switchboard-auth", "switchboard"


class Keys:
    def __init__(self) -> None:
        self.private: dict[str, Ed25519PrivateKey] = {}
        self.public: dict[str, jwt.PyJWK] = {}
        self.lookups: list[str] = []

    def add(self) -> str:
        kid = uuid.uuid4().hex
        self.private[kid] = Ed25519PrivateKey.generate()
        return kid

    async def key(self, kid: str) -> jwt.PyJWK | None:
        self.lookups.append(kid)
        private = self.private.get(kid)
        if private is None:
            self.public.pop(kid, None)
            return None
        # Parsed once per key, as the services' key sources do.
        public = self.public.get(kid)
        if public is None:
            public = self.public[kid] = jwt.PyJWK.from_dict(
                {
                    **jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key(), as_dict=True),
                    "alg": "EdDSA",
                    "kid": kid,
                }
            )
        return public

    def remove(self, kid: str) -> None:
        """Stops publishing a key."""
        del self.private[kid]

    def sign(self, kid: str, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "user-1",
            "name": "ada",
            "role": "user",
            "jti": uuid.uuid4().hex,
            "sid": "family-1",
            "iat": now,
            "exp": now + 300,
        }
        claims.update(overrides)
        return jwt.encode(claims, self.private[kid], algorithm="EdDSA", headers={"kid": kid})


class Revocations:
    def __init__(self) -> None:
        self.token_ids: set[str] = set()
        self.session_ids: set[str] = set()

    def is_revoked(self, token_id: str, session_id: str) -> bool:
        return token_id in self.token_ids or session_id in self.session_ids
