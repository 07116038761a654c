"""`switchboard.auth.v1.AuthService`: validates requests, translates proto <->
domain, and hands the verified caller to the domain.

Login, RefreshToken, GetJwks and ListTokenRevocations are public; every other
method gets its caller from the authentication interceptor.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from switchboard.auth.v1 import api_key_pb2, auth_service_pb2, auth_service_pb2_grpc, token_pb2, user_pb2

from services.auth.domain import ApiKey, AuthDomain, Introspection, TokenPair, User
from services.auth.policy import PASSWORD_MAX_CHARS, USERNAME_RULE, password_problem, username_problem
from services.common.auth import Role
from services.common.convert import from_timestamp, timestamp, utcnow
from services.common.errors import FieldViolation, InvalidArgument, Violations
from services.common.interceptors import principal_of
from services.common.pagination import next_page_token, page_request

SERVICE_NAME = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
PUBLIC_METHODS = frozenset(
    f"/{SERVICE_NAME}/{method}" for method in ("Login", "RefreshToken", "GetJwks", "ListTokenRevocations")
)

MAX_TOKEN_CHARS = 4096
MAX_USERNAME_CHARS = 64
MAX_REQUEST_ID_CHARS = 128
MAX_DISPLAY_NAME_CHARS = 100
REVOCATIONS_DEFAULT_PAGE, REVOCATIONS_MAX_PAGE = 500, 1000
API_KEYS_DEFAULT_PAGE, API_KEYS_MAX_PAGE = 50, 100

ROLE_TO_PROTO = {
    Role.ADMIN: user_pb2.ROLE_ADMIN,
    Role.USER: user_pb2.ROLE_USER,
    Role.SERVICE: user_pb2.ROLE_SERVICE,
}
ROLE_FROM_PROTO = {value: role for role, value in ROLE_TO_PROTO.items()}


def user_to_proto(user: User) -> user_pb2.User:
    return user_pb2.User(
        user_id=user.user_id,
        username=user.username,
        role=ROLE_TO_PROTO[user.role],
        create_time=timestamp(user.created_at),
    )


def api_key_to_proto(key: ApiKey) -> api_key_pb2.ApiKey:
    return api_key_pb2.ApiKey(
        api_key_id=key.api_key_id,
        user_id=key.user_id,
        display_name=key.display_name,
        create_time=timestamp(key.created_at),
        expire_time=timestamp(key.expires_at),
        revoke_time=timestamp(key.revoked_at),
        last_use_time=timestamp(key.last_used_at),
    )


def tokens_to_proto(tokens: TokenPair) -> token_pb2.TokenPair:
    return token_pb2.TokenPair(
        access_token=tokens.access_token,
        access_token_expire_time=timestamp(tokens.access_expires_at),
        refresh_token=tokens.refresh_token,
        refresh_token_expire_time=timestamp(tokens.refresh_expires_at),
        token_type="Bearer",
    )


def introspection_to_proto(result: Introspection) -> auth_service_pb2.IntrospectTokenResponse:
    return auth_service_pb2.IntrospectTokenResponse(
        active=result.active,
        inactive_reason=result.inactive_reason,
        user_id=result.user_id,
        username=result.username,
        role=ROLE_TO_PROTO[result.role] if result.role is not None else user_pb2.ROLE_UNSPECIFIED,
        token_id=result.token_id,
        issue_time=timestamp(result.issued_at),
        expire_time=timestamp(result.expires_at),
    )


def _check_token(violations: Violations, field: str, token: str) -> None:
    if not token:
        violations.add(field, "is required")
    elif len(token) > MAX_TOKEN_CHARS:
        violations.add(field, f"must be at most {MAX_TOKEN_CHARS} characters")


def _check_request_id(violations: Violations, request_id: str) -> None:
    violations.check(
        len(request_id) <= MAX_REQUEST_ID_CHARS,
        "request_id",
        f"must be at most {MAX_REQUEST_ID_CHARS} characters",
    )


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(self, domain: AuthDomain) -> None:
        self._domain = domain

    async def Login(
        self, request: auth_service_pb2.LoginRequest, context: Any
    ) -> auth_service_pb2.LoginResponse:
        violations = Violations()
        kind = request.WhichOneof("credentials")
        if kind == "password":
            username, password = request.password.username, request.password.password
            if not username:
                violations.add("password.username", "is required")
            elif len(username) > MAX_USERNAME_CHARS:
                violations.add("password.username", f"must be at most {MAX_USERNAME_CHARS} characters")
            if not password:
                violations.add("password.password", "is required")
            elif len(password) > PASSWORD_MAX_CHARS:
                violations.add("password.password", f"must be at most {PASSWORD_MAX_CHARS} characters")
            violations.raise_if_any()
            user, tokens = await self._domain.login_with_password(username, password)
        elif kind == "api_key":
            _check_token(violations, "api_key", request.api_key)
            violations.raise_if_any()
            user, tokens = await self._domain.login_with_api_key(request.api_key)
        else:
            violations.add("credentials", "set either password or api_key")
            violations.raise_if_any()
            raise AssertionError("unreachable")
        return auth_service_pb2.LoginResponse(tokens=tokens_to_proto(tokens), user=user_to_proto(user))

    async def RefreshToken(
        self, request: auth_service_pb2.RefreshTokenRequest, context: Any
    ) -> auth_service_pb2.RefreshTokenResponse:
        violations = Violations()
        _check_token(violations, "refresh_token", request.refresh_token)
        violations.raise_if_any()
        tokens = await self._domain.refresh(request.refresh_token)
        return auth_service_pb2.RefreshTokenResponse(tokens=tokens_to_proto(tokens))

    async def RevokeToken(
        self, request: auth_service_pb2.RevokeTokenRequest, context: Any
    ) -> auth_service_pb2.RevokeTokenResponse:
        caller = principal_of(context)
        violations = Violations()
        _check_token(violations, "token", request.token)
        violations.raise_if_any()
        await self._domain.revoke_token(caller, request.token)
        return auth_service_pb2.RevokeTokenResponse()

    async def GetJwks(
        self, request: auth_service_pb2.GetJwksRequest, context: Any
    ) -> auth_service_pb2.GetJwksResponse:
        return auth_service_pb2.GetJwksResponse(
            keys=[token_pb2.JsonWebKey(**key.jwk()) for key in self._domain.jwks()]
        )

    async def ListTokenRevocations(
        self, request: auth_service_pb2.ListTokenRevocationsRequest, context: Any
    ) -> auth_service_pb2.ListTokenRevocationsResponse:
        violations = Violations()
        violations.check(request.after_sequence >= 0, "after_sequence", "must not be negative")
        violations.check(request.page_size >= 0, "page_size", "must not be negative")
        violations.raise_if_any()
        size = min(request.page_size or REVOCATIONS_DEFAULT_PAGE, REVOCATIONS_MAX_PAGE)
        rows, last = await self._domain.list_revocations(request.after_sequence, size)
        return auth_service_pb2.ListTokenRevocationsResponse(
            revocations=[
                token_pb2.TokenRevocation(
                    sequence=row.sequence,
                    token_id=row.token_id or "",
                    session_id=row.session_id or "",
                    expire_time=timestamp(row.expires_at),
                )
                for row in rows
            ],
            last_sequence=last,
        )

    async def IntrospectToken(
        self, request: auth_service_pb2.IntrospectTokenRequest, context: Any
    ) -> auth_service_pb2.IntrospectTokenResponse:
        caller = principal_of(context)
        violations = Violations()
        _check_token(violations, "token", request.token)
        violations.raise_if_any()
        return introspection_to_proto(await self._domain.introspect(caller, request.token))

    async def GetCurrentUser(
        self, request: auth_service_pb2.GetCurrentUserRequest, context: Any
    ) -> auth_service_pb2.GetCurrentUserResponse:
        user = await self._domain.current_user(principal_of(context))
        return auth_service_pb2.GetCurrentUserResponse(user=user_to_proto(user))

    async def CreateUser(
        self, request: auth_service_pb2.CreateUserRequest, context: Any
    ) -> auth_service_pb2.CreateUserResponse:
        caller = principal_of(context)
        caller.require_role(Role.ADMIN)  # before validation: others learn nothing of the rules
        violations = Violations()
        if not request.username:
            violations.add("username", "is required")
        elif username_problem(request.username):
            violations.add("username", USERNAME_RULE)
        problem = password_problem(request.password)
        if problem:
            violations.add("password", problem)
        role = ROLE_FROM_PROTO.get(request.role)
        if role is None:
            violations.add("role", "must be ROLE_ADMIN, ROLE_USER or ROLE_SERVICE")
        _check_request_id(violations, request.request_id)
        violations.raise_if_any()
        assert role is not None
        user = await self._domain.create_user(
            caller, request.username, request.password, role, request.request_id
        )
        return auth_service_pb2.CreateUserResponse(user=user_to_proto(user))

    async def CreateApiKey(
        self, request: auth_service_pb2.CreateApiKeyRequest, context: Any
    ) -> auth_service_pb2.CreateApiKeyResponse:
        caller = principal_of(context)
        violations = Violations()
        name = request.display_name
        if not name.strip():
            violations.add("display_name", "is required")
        elif len(name) > MAX_DISPLAY_NAME_CHARS:
            violations.add("display_name", f"must be at most {MAX_DISPLAY_NAME_CHARS} characters")
        expires_at = from_timestamp(request.expire_time) if request.HasField("expire_time") else None
        if expires_at is not None and expires_at <= utcnow():
            violations.add("expire_time", "must be in the future")
        _check_request_id(violations, request.request_id)
        violations.raise_if_any()
        key, secret = await self._domain.create_api_key(caller, name, expires_at, request.request_id)
        return auth_service_pb2.CreateApiKeyResponse(api_key=api_key_to_proto(key), secret=secret or "")

    async def RevokeApiKey(
        self, request: auth_service_pb2.RevokeApiKeyRequest, context: Any
    ) -> auth_service_pb2.RevokeApiKeyResponse:
        caller = principal_of(context)
        violations = Violations()
        if not request.api_key_id:
            violations.add("api_key_id", "is required")
        elif len(request.api_key_id) > 32:
            violations.add("api_key_id", "is not an API key id")
        violations.raise_if_any()
        key = await self._domain.revoke_api_key(caller, request.api_key_id)
        return auth_service_pb2.RevokeApiKeyResponse(api_key=api_key_to_proto(key))

    async def ListApiKeys(
        self, request: auth_service_pb2.ListApiKeysRequest, context: Any
    ) -> auth_service_pb2.ListApiKeysResponse:
        caller = principal_of(context)
        # The token is bound to the caller, so it cannot page another user's keys.
        filters = {"user_id": caller.user_id}
        page = page_request(
            request.page_size,
            request.page_token,
            default=API_KEYS_DEFAULT_PAGE,
            maximum=API_KEYS_MAX_PAGE,
            filters=filters,
        )
        after = _decode_cursor(page.after)
        keys, next_after = await self._domain.list_api_keys(caller, page.size, after)
        token = next_page_token([next_after[0].isoformat(), next_after[1]], filters) if next_after else ""
        return auth_service_pb2.ListApiKeysResponse(
            api_keys=[api_key_to_proto(key) for key in keys], next_page_token=token
        )


def _decode_cursor(after: Any) -> tuple[datetime, str] | None:
    """The (create time, id) a page token continues after; the token was made by
    `next_page_token`, but its content comes from the client: check it."""
    if after is None:
        return None
    try:
        created, key_id = after
        moment = datetime.fromisoformat(created)
    except (TypeError, ValueError):
        raise InvalidArgument([FieldViolation("page_token", "is not a token this method returned")]) from None
    if moment.tzinfo is None or not isinstance(key_id, str):
        raise InvalidArgument([FieldViolation("page_token", "is not a token this method returned")])
    return moment, key_id
