"""The account rules shared by configuration and requests: usernames and passwords."""

from __future__ import annotations

import re

USERNAME_PATTERN = re.compile(r"^[a-z][a-z0-9._-]{2,63}$")
USERNAME_RULE = "must be 3-64 characters of [a-z0-9._-], starting with a letter"
PASSWORD_MIN_CHARS = 12
PASSWORD_MAX_CHARS = 256


def username_problem(username: str) -> str | None:
    """Why a username breaks the rule, or None when it is acceptable."""
    return None if USERNAME_PATTERN.match(username) else USERNAME_RULE


def password_problem(password: str) -> str | None:
    """Why a password breaks the policy, or None when it is acceptable."""
    if len(password) < PASSWORD_MIN_CHARS:
        return f"must have at least {PASSWORD_MIN_CHARS} characters"
    if len(password) > PASSWORD_MAX_CHARS:
        return f"must have at most {PASSWORD_MAX_CHARS} characters"
    return None
