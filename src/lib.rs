//! catena-ingest: verified Catena webhooks -> RabbitMQ -> exactly-once fleet state in PostgreSQL.
//!
//! One module per concept. The binary (`src/main.rs`) only parses the command line and calls
//! into these; integration tests drive the same entry points in-process.

pub mod alerts;
pub mod bench;
pub mod broker;
pub mod config;
pub mod db;
pub mod dev;
pub mod envelope;
pub mod fleet;
pub mod gunzip;
pub mod metrics;
pub mod parked;
pub mod relay;
pub mod scenario;
pub mod secrets;
pub mod send;
pub mod shutdown;
pub mod signature;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod worker;
