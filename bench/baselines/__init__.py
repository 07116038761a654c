"""What Switchboard's figures are compared with, each measured again in the same
run: bare gRPC (unary echo, with and without the stock OpenTelemetry
interceptors; server streams), Celery no-op tasks on Redis, raw Redis Streams."""
