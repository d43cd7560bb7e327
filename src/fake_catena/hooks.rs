//! `/_fake/*`: what a test or the demo does to the fake from outside, with no token: emit events
//! (one by one or a generated scenario), read the ledger, a DLQ and the API calls, change knobs.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::config::FakeConfig;
use super::errors::ApiError;
use super::state::{Call, Fake, LedgerEntry};
use crate::loadgen::scenario::{self, ScenarioOptions};

#[derive(Debug, Deserialize)]
struct Emit {
    event_name: String,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    id: Option<Uuid>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Emit),
    Many(Vec<Emit>),
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::invalid(&["body"], error.to_string(), "json_invalid"))
}

/// `POST /_fake/emit` with `{event_name, data, id?}` or an array of them. Answers the ids, `null`
/// for an event no subscription took.
pub(super) async fn emit(State(fake): State<Fake>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let events = match parse(&body)? {
        OneOrMany::One(event) => vec![event],
        OneOrMany::Many(events) => events,
    };
    let emitted: Vec<Option<Uuid>> = events
        .into_iter()
        .map(|e| fake.emit(&e.event_name, e.data, e.id))
        .collect();
    Ok(Json(json!({ "emitted": emitted })))
}

#[derive(Debug, Deserialize)]
struct Scenario {
    fleets: usize,
    #[serde(default = "default_seed")]
    seed: u64,
    /// Events per second; 0 emits them all at once.
    #[serde(default)]
    rate: f64,
    #[serde(default)]
    ref_prefix: Option<String>,
}

fn default_seed() -> u64 {
    1
}

/// `POST /_fake/scenario {fleets, seed, rate, ref_prefix?}`: generate the fleets' lifecycles
/// and emit them in order in the background. Answers 202 with the number of events.
pub(super) async fn scenario(
    State(fake): State<Fake>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: Scenario = parse(&body)?;
    let mut options = ScenarioOptions::new(request.fleets, request.seed);
    if let Some(prefix) = request.ref_prefix {
        options.ref_prefix = prefix;
    }
    let events = scenario::generate(&options);
    let count = events.len();
    let pause = (request.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / request.rate));
    let shutdown = fake.shutdown().clone();
    tokio::spawn(async move {
        let mut ticks = pause.map(tokio::time::interval);
        for event in &events {
            if let Some(ticks) = &mut ticks {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = ticks.tick() => {}
                }
            }
            fake.emit_scenario_event(event);
        }
        tracing::info!(events = events.len(), "fake-catena: scenario emitted");
    });
    Ok((StatusCode::ACCEPTED, Json(json!({ "events": count }))))
}

pub(super) async fn ledger(State(fake): State<Fake>) -> Json<Vec<LedgerEntry>> {
    Json(fake.ledger())
}

pub(super) async fn calls(State(fake): State<Fake>) -> Json<Vec<Call>> {
    Json(fake.calls())
}

/// A dead letter as `GET /_fake/dlq/{id}` shows it.
#[derive(Debug, Serialize)]
struct DeadLetter {
    id: Uuid,
    event_name: String,
    delivery_attempt: u32,
    dead_lettered_at: Option<DateTime<Utc>>,
}

pub(super) async fn dlq(
    State(fake): State<Fake>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut state = fake.lock();
    let ttl = state.config.dlq_ttl;
    let subscription = state
        .subscription_mut(&id)
        .ok_or_else(|| ApiError::not_found(&id))?;
    subscription.expire_dlq(Utc::now(), ttl);
    let messages: Vec<DeadLetter> = subscription
        .dlq
        .iter()
        .map(|m| DeadLetter {
            id: m.id,
            event_name: m.event_name.clone(),
            delivery_attempt: m.attempts,
            dead_lettered_at: m.dead_lettered_at,
        })
        .collect();
    Ok(Json(
        json!({ "webhook_id": id, "count": messages.len(), "messages": messages }),
    ))
}

pub(super) async fn get_config(State(fake): State<Fake>) -> Json<FakeConfig> {
    Json(fake.config())
}

/// `PUT /_fake/config` with a partial object, merged into the running config; answers the result.
pub(super) async fn put_config(
    State(fake): State<Fake>,
    body: Bytes,
) -> Result<Json<FakeConfig>, ApiError> {
    let patch: Value = parse(&body)?;
    let mut state = fake.lock();
    state
        .config
        .merge(&patch)
        .map_err(|error| ApiError::invalid(&["body"], error.to_string(), "value_error"))?;
    tracing::info!("fake-catena: config changed");
    Ok(Json(state.config.clone()))
}
