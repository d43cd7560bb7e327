//! Catena's control plane as we use it: its API's wire types ([`model`]) and the client that
//! follows the documented API ([`client`]: OAuth client credentials, cursor pagination, 429 with
//! and without `Retry-After`, retries only for idempotent calls).

pub mod client;
pub mod model;

pub use client::{CatenaClient, CatenaError};
