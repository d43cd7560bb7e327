//! Generated scenarios (`catena_ingest::loadgen::scenario`) sent through a relay (`catena_ingest::loadgen::send`).

use catena_ingest::loadgen::send::{self, Outgoing, SendOptions};
use tokio::task::JoinHandle;

use super::{SECRET, WEBHOOK_ID};

pub use catena_ingest::loadgen::scenario::{Delivery, Event, duplicated_and_shuffled, in_order};
pub use catena_ingest::loadgen::send::SendReport;

/// The events of `fleets` generated lifecycles, signed for [`WEBHOOK_ID`], `fleet_ref`s unique
/// to the seed.
pub fn scenario(fleets: usize, seed: u64) -> Vec<Event> {
    generate(fleets, seed, false)
}

/// Like [`scenario`], with every branch many times over (`ScenarioOptions::churn`).
pub fn churn_scenario(fleets: usize, seed: u64) -> Vec<Event> {
    generate(fleets, seed, true)
}

fn generate(fleets: usize, seed: u64, churn: bool) -> Vec<Event> {
    let mut options = catena_ingest::loadgen::scenario::ScenarioOptions::new(fleets, seed);
    options.webhook_id = WEBHOOK_ID.into();
    options.ref_prefix = format!("F{seed}");
    options.churn = churn;
    catena_ingest::loadgen::scenario::generate(&options)
}

fn prepare(
    url: &str,
    events: &[Event],
    deliveries: &[Delivery],
    concurrency: usize,
) -> (SendOptions, Vec<Outgoing>) {
    let mut options = SendOptions::new(url, SECRET);
    options.delivery.concurrency = concurrency;
    let outgoing = deliveries
        .iter()
        .map(|d| Outgoing::from_delivery(events, d))
        .collect();
    (options, outgoing)
}

/// Send `deliveries` of `events` to the relay at `url`, `concurrency` at a time, with Catena's
/// retries; returns the send report.
pub async fn send_deliveries(
    url: &str,
    events: &[Event],
    deliveries: &[Delivery],
    concurrency: usize,
) -> SendReport {
    let (options, outgoing) = prepare(url, events, deliveries, concurrency);
    send::send_all(&options, outgoing).await
}

/// Every event once, in order, `concurrency` at a time, with no retry: each answer as the relay
/// gave it (for tests that count refusals).
pub async fn send_once(url: &str, events: &[Event], concurrency: usize) -> SendReport {
    let (mut options, outgoing) = prepare(url, events, &in_order(events), concurrency);
    options.delivery.retries = 0;
    send::send_all(&options, outgoing).await
}

/// [`send_deliveries`] in the background.
pub fn spawn_deliveries(
    url: &str,
    events: &[Event],
    deliveries: &[Delivery],
    concurrency: usize,
) -> JoinHandle<SendReport> {
    let (options, outgoing) = prepare(url, events, deliveries, concurrency);
    tokio::spawn(async move { send::send_all(&options, outgoing).await })
}

/// Steady load in the background: every event once, in order, `rate` requests a second, with
/// Catena's retry policy (3 retries within ~2 s).
pub fn steady_load(url: &str, events: &[Event], rate: f64) -> JoinHandle<SendReport> {
    let (mut options, outgoing) = prepare(url, events, &in_order(events), 32);
    options.delivery.rate = rate;
    tokio::spawn(async move { send::send_all(&options, outgoing).await })
}
