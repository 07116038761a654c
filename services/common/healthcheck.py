"""`python -m services.common.healthcheck HOST:PORT [SERVICE]`: a container health probe.

Asks the server's `grpc.health.v1.Health` for SERVICE (default: the whole
server) and exits 0 when it answers SERVING, 1 otherwise, printing what it saw.
docker-compose.yml runs it inside each service's container: the image then needs
no separate grpc_health_probe binary, and it reports exactly what the launcher's
own readiness wait checks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TIMEOUT_SECONDS = 3.0


def check(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_SECONDS) -> str:
    """The health status name the server at `address` gives `service`.

    Raises grpc.RpcError when the server does not answer (not listening, too
    slow, or `service` unknown: NOT_FOUND).
    """
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.healthcheck",
        description="Exit 0 when a gRPC server's health service answers SERVING.",
    )
    parser.add_argument("address", help="host:port of the server, e.g. 127.0.0.1:50051")
    parser.add_argument("service", nargs="?", default="", help="a service name; default: the whole server")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds to wait")
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as exc:
        # A grpc.RpcError raised by a call is also a grpc.Call: it has code() and details().
        call: grpc.Call = exc  # type: ignore[assignment]
        details = f": {call.details()}" if call.details() else ""
        print(f"{args.address}: {call.code().name}{details}", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
