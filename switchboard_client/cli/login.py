"""`login`, `logout`, `whoami`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys

import grpc
from switchboard.auth.v1 import auth_service_pb2, user_pb2

from switchboard_client.cli.context import Context
from switchboard_client.cli.credentials import StoredLogin, bearer
from switchboard_client.cli.errors import CliError, UsageError
from switchboard_client.cli.output import message_dict


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    login = commands.add_parser(
        "login",
        parents=[common],
        help="log in and keep the tokens in the config directory",
        description=(
            "Logs in with a username and password (prompted for when not given) or an API key, and "
            "keeps the access and refresh tokens in $XDG_CONFIG_HOME/switchboard/credentials.json "
            "(~/.config/switchboard/ by default), mode 0600. Later commands refresh the access token "
            "with the refresh token when it expires. Tokens are never printed."
        ),
    )
    login.add_argument("-u", "--username", help="prompted for on a terminal when missing")
    login.add_argument(
        "--api-key",
        nargs="?",
        const="",
        metavar="KEY",
        help="log in with an API key instead (prompted for when given without a value)",
    )
    login.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password (or, with --api-key, the key) from the first line of stdin",
    )
    login.set_defaults(handler=login_command)

    logout = commands.add_parser("logout", parents=[common], help="revoke the stored tokens and forget them")
    logout.set_defaults(handler=logout_command)

    whoami = commands.add_parser("whoami", parents=[common], help="the logged-in user")
    whoami.set_defaults(handler=whoami_command)


def _read_secret(args: argparse.Namespace, prompt: str) -> str:
    if args.password_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        secret = getpass.getpass(prompt)
    else:
        raise UsageError("no terminal to prompt on: pass the secret on stdin with --password-stdin")
    if not secret:
        raise UsageError("the secret is empty")
    return secret


async def login_command(ctx: Context) -> int:
    args = ctx.args
    request = auth_service_pb2.LoginRequest()
    if args.api_key is not None:
        if args.username:
            raise UsageError("--api-key and --username exclude each other")
        request.api_key = args.api_key or await asyncio.to_thread(_read_secret, args, "API key: ")
    else:
        username = args.username
        if not username:
            if not sys.stdin.isatty():
                raise UsageError("--username is required when there is no terminal to prompt on")
            # Prompts block: off the event loop.
            username = (await asyncio.to_thread(input, "username: ")).strip()
        request.password.username = username
        request.password.password = await asyncio.to_thread(_read_secret, args, f"password for {username}: ")
    response = await ctx.call_anonymous("auth", "Login", request)
    user = response.user
    ctx.store.save(
        StoredLogin.from_tokens(
            response.tokens,
            auth_address=ctx.endpoints.auth,
            username=user.username,
            user_id=user.user_id,
            role=user_pb2.Role.Name(user.role).removeprefix("ROLE_").lower(),
        )
    )
    if ctx.out.json_mode:
        ctx.out.json({"user": message_dict(user), "credentialsFile": str(ctx.store.path)})
    else:
        role = user_pb2.Role.Name(user.role).removeprefix("ROLE_").lower()
        ctx.out.line(f"logged in as {user.username} ({role}) at {ctx.endpoints.auth}")
        ctx.out.note(f"tokens saved in {ctx.store.path}")
    return 0


async def logout_command(ctx: Context) -> int:
    if ctx.store.load() is None:
        ctx.out.note("not logged in")
        return 0
    # Revoking the refresh token revokes its whole family, the access tokens
    # included: every service refuses them within seconds.
    try:
        access_token = await ctx.session.access_token()
        login = ctx.session.stored()
        await ctx.stub("auth").RevokeToken(
            auth_service_pb2.RevokeTokenRequest(token=login.refresh_token),
            metadata=bearer(access_token),
            timeout=ctx.timeout,
        )
        revoked = True
    except (grpc.aio.AioRpcError, CliError) as error:
        # Forgotten anyway: logging out must work while the server is away.
        why = error.code().name if isinstance(error, grpc.aio.AioRpcError) else error.message
        ctx.out.note(f"could not revoke the tokens ({why}): forgetting them only")
        revoked = False
    username = ctx.session.stored().username
    ctx.store.delete()
    if ctx.out.json_mode:
        ctx.out.json({"loggedOut": True, "revoked": revoked})
    else:
        ctx.out.line(f"logged out {username}")
    return 0


async def whoami_command(ctx: Context) -> int:
    response = await ctx.call("auth", "GetCurrentUser", auth_service_pb2.GetCurrentUserRequest())
    if ctx.out.json_mode:
        ctx.out.message(response)
        return 0
    user = response.user
    ctx.out.line(f"{user.username} ({user_pb2.Role.Name(user.role).removeprefix('ROLE_').lower()})")
    ctx.out.line(f"user id    {user.user_id}")
    ctx.out.line(f"auth       {ctx.endpoints.auth}")
    return 0
