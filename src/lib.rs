//! catena-ingest: verified Catena webhooks -> RabbitMQ -> exactly-once fleet state in PostgreSQL.
//!
//! # Layout
//!
//! One folder per component, one module per concept. The binary (`src/main.rs`, `src/cli/`, one
//! file per subcommand) only parses the command line and calls into these; the integration
//! tests (`tests/it/`) drive the same entry points in-process.
//!
//! The pipeline, in the order an event travels:
//! - [`relay`]: the HTTP edge. [`relay::handler`](relay) runs one request: cap, [`relay::gunzip`],
//!   [`relay::signature`] with [`relay::secrets`], publish with a confirm, answer.
//! - [`message`]: the AMQP message contract (every header and property, their builders and
//!   readers, [`message::ParkReason`]) shared by relay, worker, `parked` and the load generator.
//! - [`broker`]: RabbitMQ connections, the confirmed [`broker::Publisher`] and the
//!   [`broker::topology`] (queue names, retry tiers, parking lot).
//! - [`worker`]: consumers that gather batches, apply them, ack after commit, and reroute
//!   failures to a retry tier or the parking lot.
//! - [`envelope`]: decoding Catena's envelope into an [`envelope::Event`] with its dedup key and
//!   event time.
//! - [`state`]: applying a batch to the read model; `state::plan` is the pure state rules,
//!   `state::sql` the statements, `state::locks` the entity locks.
//! - [`alerts`]: alert kinds, the outbox notifier and its sinks, the state gauges.
//!
//! Infrastructure: [`config`] (the settings tree, where every default is written once),
//! [`store`] (PostgreSQL pool, [`store::DbError`] classification, migrations), [`retry`] (the
//! one reconnect backoff), [`tls`], [`metrics`] (every metric name: a public contract),
//! [`telemetry`], [`shutdown`].
//!
//! [`retention`] prunes what grows per event (dedup keys, failed executions, warnings,
//! delivered notifications, the bodies of ignored events) in small batches, one worker at a time.
//!
//! Catena's side of the loop: [`catena`] (the subscription API's wire types and our client),
//! [`control`] (`subscriptions sync`/`rotate`, the registry, the secrets sink, and the
//! reconciler that reactivates stale subscriptions and replays their DLQs) and [`fake_catena`]
//! (the stand-in for Catena in tests and the demo).
//!
//! Around the pipeline: [`ops`] (what the operator commands `parked`, `fleet` and `alerts` do),
//! [`loadgen`] (scenarios, Catena-style sending, end-to-end reports) and [`fake_catena`] (an
//! in-memory Catena: subscription API, delivery, breaker and DLQ, for tests and the demo).

pub mod alerts;
pub mod broker;
pub mod catena;
pub mod config;
pub mod control;
pub mod envelope;
pub mod fake_catena;
pub mod loadgen;
pub mod local;
pub mod message;
pub mod metrics;
pub mod ops;
pub mod relay;
pub mod retention;
pub mod retry;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod worker;
