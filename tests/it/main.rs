//! Every integration test, in one binary (one link step). They run against the real PostgreSQL
//! and RabbitMQ on this machine (`scripts/setup.sh` starts them), nothing mocked; each test gets
//! its own broker prefix and database from `helpers::TestPipeline`, so they run in parallel, and
//! leave nothing behind even when they fail.
//!
//! ```sh
//! cargo test --test it                                          # every test but the restart group
//! cargo test --test it relay::                                  # one module (relay, worker, faults,
//!                                                               #  alerts, operate, retention, state,
//!                                                               #  fuzz, tls, signature_vectors, sre)
//! cargo test --test it -- --ignored --test-threads 1 restarts::  # the restart group, alone
//! ```
//!
//! The restart group restarts the shared RabbitMQ and PostgreSQL, so its tests are `#[ignore]`d
//! in the parallel run and `.ci/run` runs them on their own, one at a time.

mod helpers;

mod alerts;
mod broker_contract;
mod control_plane;
mod failover;
mod faults;
mod fuzz;
mod operate;
mod relay;
mod relay_memory;
mod restarts;
mod retention;
mod signature_vectors;
mod sre;
mod state;
mod tls;
mod worker;
