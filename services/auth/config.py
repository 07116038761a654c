"""Configuration of the auth service, from `SWITCHBOARD_AUTH_*` variables."""

from __future__ import annotations

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from services.auth.policy import password_problem, username_problem
from services.common.config import ServiceConfig

DAY_SECONDS = 24 * 3600.0


class AuthConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_AUTH_", frozen=True, extra="ignore")

    service_name: str = "auth"
    port: int = Field(default=50051, ge=0, le=65535)

    # The first admin, created at start-up when missing. There is no default
    # password: a first start without one stops naming the variable.
    admin_username: str = "admin"
    admin_password: SecretStr | None = None
    # Comma-separated `username=password` pairs, created (or their password
    # updated) at start-up with the role `service`. Passwords must not contain commas.
    service_accounts: SecretStr = SecretStr("")

    access_token_ttl_seconds: float = Field(default=900.0, ge=10, le=DAY_SECONDS)
    refresh_token_ttl_seconds: float = Field(default=30 * DAY_SECONDS, ge=60, le=365 * DAY_SECONDS)
    # A new signing key this often; retired keys stay published until every
    # token they signed has expired.
    key_rotation_seconds: float = Field(default=DAY_SECONDS, ge=1, le=365 * DAY_SECONDS)

    # Login throttling: this many failed logins for one username within the
    # window refuse further attempts for it until the window has passed.
    login_max_failures: int = Field(default=5, ge=1, le=1000)
    login_failure_window_seconds: float = Field(default=300.0, gt=0, le=DAY_SECONDS)

    # Argon2id cost (argon2-cffi's defaults: RFC 9106's low-memory profile).
    argon2_time_cost: int = Field(default=3, ge=1, le=20)
    argon2_memory_kib: int = Field(default=65536, ge=8, le=4 * 1024 * 1024)
    argon2_parallelism: int = Field(default=4, ge=1, le=64)

    @field_validator("admin_username")
    @classmethod
    def _check_admin_username(cls, value: str) -> str:
        problem = username_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("admin_password")
    @classmethod
    def _check_admin_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        problem = password_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("service_accounts")
    @classmethod
    def _check_service_accounts(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # Messages name the account, never the password.
        accounts = _parse_service_accounts(value.get_secret_value())
        if info.data.get("admin_username") in accounts:
            raise ValueError(f"names the admin user {info.data['admin_username']!r}")
        return value

    def service_account_credentials(self) -> dict[str, str]:
        """username -> password of every configured service account."""
        return _parse_service_accounts(self.service_accounts.get_secret_value())

    @property
    def key_check_seconds(self) -> float:
        """How often rotation and clean-up run: often enough for short rotations."""
        return min(60.0, self.key_rotation_seconds / 4)


def _parse_service_accounts(text: str) -> dict[str, str]:
    accounts: dict[str, str] = {}
    for position, entry in enumerate(part.strip() for part in text.split(",")):
        if not entry:
            continue
        username, separator, password = entry.partition("=")
        username = username.strip()
        if not separator:
            raise ValueError(f"entry {position + 1} is not 'username=password'")
        if username_problem(username):
            raise ValueError(f"entry {position + 1}: the username {username_problem(username)}")
        problem = password_problem(password)
        if problem:
            raise ValueError(f"the password of {username!r} {problem}")
        if username in accounts:
            raise ValueError(f"{username!r} is listed twice")
        accounts[username] = password
    return accounts
