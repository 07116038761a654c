// A polyglot client: loads the .proto contracts at run time (no generated code)
// and performs Login -> StartRun -> Subscribe with acknowledgements.
//
// Configuration (environment): SWITCHBOARD_AUTH_ADDRESS, SWITCHBOARD_EXECUTOR_ADDRESS,
// SWITCHBOARD_EVENTS_ADDRESS, SWITCHBOARD_USERNAME, SWITCHBOARD_PASSWORD.
// Prints one JSON line: the run id, its final state and the events received.
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const protos = path.resolve(here, "../../protos");
const definition = protoLoader.loadSync(
  [
    "switchboard/auth/v1/auth_service.proto",
    "switchboard/executor/v1/executor_service.proto",
    "switchboard/events/v1/events_service.proto",
  ],
  { includeDirs: [protos, path.join(protos, ".deps")], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true },
);
const api = grpc.loadPackageDefinition(definition).switchboard;
const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const insecure = grpc.credentials.createInsecure();
const auth = new api.auth.v1.AuthService(env("SWITCHBOARD_AUTH_ADDRESS"), insecure);
const executor = new api.executor.v1.ExecutorService(env("SWITCHBOARD_EXECUTOR_ADDRESS"), insecure);
const events = new api.events.v1.EventsService(env("SWITCHBOARD_EVENTS_ADDRESS"), insecure);

const call = (client, method, request, metadata) =>
  new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 15000);
    client[method](request, metadata ?? new grpc.Metadata(), { deadline }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });

const login = await call(auth, "Login", {
  password: { username: env("SWITCHBOARD_USERNAME"), password: env("SWITCHBOARD_PASSWORD") },
});
const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${login.tokens.access_token}`);

const started = await call(
  executor,
  "StartRun",
  { agent: "text-stats", input: { fields: { text: { stringValue: "Polyglot clients read the same contract. It works." } } } },
  metadata,
);
const runId = started.run.run_id;

const received = [];
const outcome = await new Promise((resolve, reject) => {
  const stream = events.Subscribe(metadata, { deadline: new Date(Date.now() + 30000) });
  stream.on("data", (message) => {
    if (message.response === "events") {
      const ids = [];
      for (const delivery of message.events.deliveries) {
        if (delivery.item !== "event") continue;
        received.push({ seq: delivery.event.seq, type: delivery.event.type });
        ids.push(delivery.event.event_id);
      }
      stream.write({ ack: { event_ids: ids } });
      const last = received[received.length - 1];
      if (last && last.type === "EVENT_TYPE_RUN_COMPLETED") {
        stream.end();
        resolve("completed");
      }
    }
  });
  stream.on("error", reject);
  stream.write({ open: { run_id: runId, start: { from_beginning: true }, max_in_flight: 10 } });
});

const final = await call(executor, "WaitRun", { run_id: runId, timeout: { seconds: 20 } }, metadata);
console.log(JSON.stringify({ run_id: runId, outcome, state: final.run.state, events: received }));
process.exit(0);
