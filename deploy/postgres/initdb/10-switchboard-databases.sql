-- One database per service (DESIGN.md: no service reads another's tables).
-- The postgres image runs this once, when its data volume is first initialised;
-- each service creates its own tables with its migrations at start-up.
CREATE DATABASE switchboard_auth;
CREATE DATABASE switchboard_registry;
CREATE DATABASE switchboard_executor;
-- Used when the events service runs with SWITCHBOARD_EVENTS_BACKEND=sql.
CREATE DATABASE switchboard_events;
