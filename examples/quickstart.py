"""Log in, start a run of the built-in `text-stats` agent, print its events as they arrive."""

import json
import os
import queue
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from switchboard.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc
from switchboard.executor.v1 import executor_service_pb2, executor_service_pb2_grpc

AUTH = os.environ.get("SWITCHBOARD_AUTH_ADDRESS", "127.0.0.1:50051")
EXECUTOR = os.environ.get("SWITCHBOARD_EXECUTOR_ADDRESS", "127.0.0.1:50053")
EVENTS = os.environ.get("SWITCHBOARD_EVENTS_ADDRESS", "127.0.0.1:50054")
# `make up` keeps the generated admin credentials here.
CREDENTIALS = Path(os.environ.get("SWITCHBOARD_CREDENTIALS", ".switchboard/credentials.json"))

admin = json.loads(CREDENTIALS.read_text())["admin"]
auth = auth_service_pb2_grpc.AuthServiceStub(grpc.insecure_channel(AUTH))
login = auth.Login(
    auth_service_pb2.LoginRequest(
        password=auth_service_pb2.PasswordCredentials(username=admin["username"], password=admin["password"])
    )
)
metadata = (("authorization", f"Bearer {login.tokens.access_token}"),)

executor = executor_service_pb2_grpc.ExecutorServiceStub(grpc.insecure_channel(EXECUTOR))
run_input = struct_pb2.Struct()
run_input.update({"text": "Switchboard runs agents. Every event arrives, in order, to its owner."})
run = executor.StartRun(
    executor_service_pb2.StartRunRequest(agent="text-stats", input=run_input), metadata=metadata
).run
print("started run", run.run_id)

# Subscribe to the run and acknowledge each batch once it is handled.
outgoing: queue.Queue[events_service_pb2.SubscribeRequest | None] = queue.Queue()
outgoing.put(
    events_service_pb2.SubscribeRequest(
        open=events_service_pb2.SubscriptionOpen(
            run_id=run.run_id, start=events_service_pb2.StartPosition(from_beginning=True)
        )
    )
)
events = events_service_pb2_grpc.EventsServiceStub(grpc.insecure_channel(EVENTS))
stream = events.Subscribe(iter(outgoing.get, None), metadata=metadata, timeout=60)
for response in stream:
    if response.WhichOneof("response") != "events":
        continue
    done = False
    for delivery in response.events.deliveries:
        event = delivery.event
        print(f"{event.seq:>3} {event_pb2.EventType.Name(event.type):<28} {dict(event.payload)}")
        done = done or event.type == event_pb2.EVENT_TYPE_RUN_COMPLETED
    outgoing.put(
        events_service_pb2.SubscribeRequest(
            ack=events_service_pb2.AckRequest(
                event_ids=[d.event.event_id for d in response.events.deliveries]
            )
        )
    )
    if done:
        break
outgoing.put(None)
stream.cancel()
print(
    "output:",
    dict(
        executor.GetRun(executor_service_pb2.GetRunRequest(run_id=run.run_id), metadata=metadata).run.output
    ),
)
