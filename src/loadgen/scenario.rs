//! Generated Catena traffic: whole fleet lifecycles, with every branch the worker must handle.
//!
//! Used by `send --fleets N` (demo and load), and by the tests as the source of truth: the same
//! seed always yields the same events, and [`Delivery`] adds Catena's at-least-once behaviour
//! (duplicates with a higher `delivery_attempt`) and out-of-order arrival.

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use uuid::{NoContext, Timestamp, Uuid};

pub const DEFAULT_WEBHOOK_ID: &str = "247b2dea-a030-48b7-9a05-ee33c1b6ab0a";
const PARTNER_ID: &str = "9531985d-5d9d-49f8-9818-e811892f902b";
const TSPS: [&str; 6] = [
    "samsara",
    "motive",
    "geotab",
    "azuga",
    "verizon_connect",
    "zonar",
];
const RESOURCES: [&str; 5] = ["vehicle", "vehicle_location", "hos_event", "user", "asset"];

/// One envelope as Catena would send it, in causal order.
#[derive(Clone, Debug)]
pub struct Event {
    pub event_name: String,
    pub id: Uuid,
    pub envelope: Value,
}

impl Event {
    /// The JSON body for a given delivery attempt (1-based, as `X-Delivery-Attempt`).
    pub fn body(&self, delivery_attempt: u32) -> Vec<u8> {
        let mut envelope = self.envelope.clone();
        envelope["delivery_attempt"] = json!(delivery_attempt);
        serde_json::to_vec(&envelope).expect("serialising a Value cannot fail")
    }

    pub fn webhook_id(&self) -> &str {
        self.envelope["webhook_id"]
            .as_str()
            .unwrap_or(DEFAULT_WEBHOOK_ID)
    }
}

/// A delivery of an event: Catena retries and replays produce several per event.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub event: usize,
    pub attempt: u32,
}

/// Options for a generated scenario.
#[derive(Clone, Debug)]
pub struct ScenarioOptions {
    pub fleets: usize,
    pub seed: u64,
    /// Prefix of `fleet_ref`s, so runs against one database do not collide.
    pub ref_prefix: String,
    pub webhook_id: String,
    /// Event time of the first fleet's first event.
    pub start: DateTime<Utc>,
    /// Every branch many times over, for the property tests: invitations re-sent with new
    /// links and declined twice, several share-agreement updates, several stale and recover
    /// episodes per connection (and statuses that are neither), bursts of failed executions
    /// over the warning threshold, schedules deactivated again with other settings.
    pub churn: bool,
}

impl ScenarioOptions {
    pub fn new(fleets: usize, seed: u64) -> Self {
        Self {
            fleets,
            seed,
            ref_prefix: "FLEET".into(),
            webhook_id: DEFAULT_WEBHOOK_ID.into(),
            start: Utc::now() - Duration::days(1),
            churn: false,
        }
    }
}

/// Generate the events of `fleets` lifecycles in causal order.
pub fn generate(options: &ScenarioOptions) -> Vec<Event> {
    stream(options).collect()
}

/// Events of `options.fleets` lifecycles (or endless fleets when `fleets == 0`), generated a
/// fleet at a time so a million-event load run never holds them all.
pub fn stream(options: &ScenarioOptions) -> impl Iterator<Item = Event> + use<> {
    let options = options.clone();
    let mut rng = StdRng::seed_from_u64(options.seed);
    (0..)
        .take_while(move |fleet| options.fleets == 0 || *fleet < options.fleets)
        .flat_map(move |fleet| {
            let mut out = Vec::with_capacity(24);
            let mut g = Generator {
                rng: &mut rng,
                out: &mut out,
                webhook_id: &options.webhook_id,
                clock: options.start + Duration::milliseconds(fleet as i64 * 1_000),
                churn: options.churn,
            };
            g.fleet(&format!("{}-{fleet}", options.ref_prefix));
            out
        })
}

/// Every event once, in causal order.
pub fn in_order(events: &[Event]) -> Vec<Delivery> {
    (0..events.len())
        .map(|event| Delivery { event, attempt: 1 })
        .collect()
}

/// Each event delivered once or more (duplicates with higher attempts, as Catena's retries and
/// DLQ replays do), then shuffled.
pub fn duplicated_and_shuffled(events: &[Event], duplicate_rate: f64, seed: u64) -> Vec<Delivery> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut deliveries = Vec::with_capacity(events.len() * 2);
    for event in 0..events.len() {
        deliveries.push(Delivery { event, attempt: 1 });
        let mut attempt = 1;
        while rng.random_bool(duplicate_rate.clamp(0.0, 0.95)) && attempt < 5 {
            attempt += 1;
            deliveries.push(Delivery { event, attempt });
        }
    }
    deliveries.shuffle(&mut rng);
    deliveries
}

struct Generator<'a> {
    rng: &'a mut StdRng,
    out: &'a mut Vec<Event>,
    webhook_id: &'a str,
    clock: DateTime<Utc>,
    churn: bool,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A UUIDv7 whose time is `t`: the worker orders events by it.
pub fn uuid_v7_at(t: DateTime<Utc>, rng: &mut impl Rng) -> Uuid {
    let ms = t.timestamp_millis() as u64;
    let mut bytes: [u8; 16] = rng.random();
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    bytes[6] = 0x70 | (bytes[6] & 0x0f);
    bytes[8] = 0x80 | (bytes[8] & 0x3f);
    let uuid = Uuid::from_bytes(bytes);
    debug_assert_eq!(
        uuid.get_timestamp().map(|t| t.to_unix().0),
        Some(Timestamp::from_unix(NoContext, ms / 1000, 0).to_unix().0)
    );
    uuid
}

impl Generator<'_> {
    fn uuid4(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.random()).into_uuid()
    }

    fn emit(&mut self, event_name: &str, records: Vec<Value>) {
        self.clock += Duration::seconds(self.rng.random_range(5..120));
        let id = uuid_v7_at(self.clock, self.rng);
        let envelope = json!({
            "version": "1.0",
            "event_name": event_name,
            "data": records,
            "webhook_id": self.webhook_id,
            "timestamp": ts(self.clock),
            "id": id,
            "delivery_attempt": 1,
        });
        self.out.push(Event {
            event_name: event_name.to_owned(),
            id,
            envelope,
        });
    }

    fn fleet(&mut self, fleet_ref: &str) {
        let invitation_id = self.uuid4();
        let fleet_id = self.uuid4();
        let created = self.clock;
        let expires = created + Duration::hours(24);
        let invitation = |status: &str, fleet_id: Option<Uuid>, extra: Value| {
            let mut record = json!({
                "id": invitation_id,
                "created_at": ts(created),
                "magic_link": format!("https://connect.catenatelematics.com/?invite={invitation_id}"),
                "expires_at": ts(expires),
                "expires_in_hours": 24,
                "status": status,
                "partner_provided_fleet_name": format!("Fleet {fleet_ref}"),
                "accepted_at": null,
                "pre_registration_access_token": null,
                "pre_registration_refresh_token": null,
                "fleet_id": fleet_id,
                "partner_slug": "partner-co",
                "partner_id": PARTNER_ID,
                "decline_reason": null,
                "declined_at": null,
                "fleet_ref": fleet_ref,
            });
            if let (Value::Object(r), Value::Object(e)) = (&mut record, extra) {
                r.extend(e);
            }
            record
        };

        self.emit(
            "invitation.created",
            vec![invitation("active", None, json!({}))],
        );
        let branch = self.rng.random_range(0..100);
        if self.churn {
            // Declined, re-sent with a new link and expiry, declined again for another reason:
            // each latest-wins field has its own newest value.
            for round in 0..self.rng.random_range(1..=2) {
                let at = ts(self.clock);
                let reason = ["not now", "wrong tsp", "already connected"][round % 3];
                self.emit(
                    "invitation.declined",
                    vec![invitation(
                        "declined",
                        None,
                        json!({"decline_reason": reason, "declined_at": at}),
                    )],
                );
                let expires_at = ts(self.clock + Duration::hours(48));
                self.emit(
                    "invitation.sent",
                    vec![invitation(
                        "active",
                        None,
                        json!({
                            "magic_link": format!("https://connect.catenatelematics.com/?invite={invitation_id}&r={round}"),
                            "expires_at": expires_at,
                        }),
                    )],
                );
            }
        }
        if branch < 5 {
            self.emit(
                "invitation.deleted",
                vec![invitation("deleted", None, json!({}))],
            );
            return;
        }
        self.emit(
            "invitation.sent",
            vec![invitation("active", None, json!({}))],
        );
        if branch < 10 {
            self.emit(
                "invitation.expired",
                vec![invitation("expired", None, json!({}))],
            );
            return;
        }
        self.emit(
            "invitation.viewed",
            vec![invitation("active", None, json!({}))],
        );
        if branch < 20 {
            let at = ts(self.clock);
            self.emit(
                "invitation.declined",
                vec![invitation(
                    "declined",
                    None,
                    json!({"decline_reason": "not interested", "declined_at": at}),
                )],
            );
            return;
        }
        let accepted_at = ts(self.clock + Duration::seconds(1));
        self.emit(
            "invitation.accepted",
            vec![invitation(
                "accepted",
                Some(fleet_id),
                json!({
                    "accepted_at": accepted_at,
                    "pre_registration_access_token": "eyJhbGciOiJIUzI1NiJ9.secret-token-do-not-log",
                }),
            )],
        );
        let share_agreement_id = self.uuid4();
        let share = |status: &str| {
            json!({
                "id": share_agreement_id,
                "fleet_id": fleet_id,
                "partner_id": PARTNER_ID,
                "fleet_ref": fleet_ref,
                "invitation_id": invitation_id,
                "status": status,
                "effective_date": accepted_at,
                "expiration_date": null,
                "scopes": {"vehicle": "read", "vehicle_location": "read"},
            })
        };
        self.emit("share_agreement.created", vec![share("active")]);
        if self.churn {
            for status in ["paused", "active", "paused"]
                .iter()
                .take(self.rng.random_range(1..=3))
            {
                self.emit("share_agreement.updated", vec![share(status)]);
            }
        }

        let tsp_count = self.rng.random_range(1..=3);
        for _ in 0..tsp_count {
            // Connection reuse: the fleet already shares this TSP with another partner, so
            // Catena skips connection.created and we first hear of it by reference.
            let reuse = self.rng.random_bool(0.2);
            let (connection_id, tsp_id) = (self.uuid4(), self.uuid4());
            let source_name = TSPS[self.rng.random_range(0..TSPS.len())];
            let connection = |status: &str| {
                json!({"id": connection_id, "source_name": source_name, "fleet_id": fleet_id,
                       "tsp_id": tsp_id, "status": status})
            };
            if !reuse {
                self.emit("connection.created", vec![connection("active")]);
            }
            let fleet_connection_id = self.uuid4();
            self.emit(
                "fleet_connection.created",
                vec![json!({"id": fleet_connection_id, "fleet_id": fleet_id, "connection_id": connection_id})],
            );
            for _ in 0..self.rng.random_range(1..=2) {
                let schedule_id = self.uuid4();
                let resource = RESOURCES[self.rng.random_range(0..RESOURCES.len())];
                let failures = if self.churn {
                    // A burst: more than the default threshold of 3 inside one hour.
                    self.rng.random_range(3..=7)
                } else {
                    self.rng.random_range(0..=3)
                };
                for _ in 0..failures {
                    let execution_id = self.uuid4();
                    let at = ts(self.clock);
                    self.emit(
                        "execution.failed",
                        vec![
                            json!({"id": execution_id, "created_at": at, "updated_at": at,
                            "schedule_id": schedule_id, "connection_id": connection_id,
                            "fleet_id": fleet_id, "status": "failed", "source_name": source_name,
                            "resource": resource}),
                        ],
                    );
                }
                let deactivations = match (self.churn, failures > 0) {
                    (true, _) => self.rng.random_range(0..=3),
                    (false, true) if self.rng.random_bool(0.25) => 1,
                    _ => 0,
                };
                for round in 0..deactivations {
                    // Later deactivations carry other settings (the newest wins).
                    let (threshold, interval) = if round == 0 {
                        (6, 300)
                    } else {
                        (
                            self.rng.random_range(3..=15),
                            60 * self.rng.random_range(1..=10),
                        )
                    };
                    self.emit(
                        "schedule.deactivated",
                        vec![json!({"id": schedule_id, "connection_id": connection_id,
                            "resource": resource, "execution_interval_seconds": interval,
                            "status": "inactive", "consecutive_error_threshold": threshold,
                            "max_concurrent_executions": 1})],
                    );
                }
            }
            let episodes = match self.churn {
                true => self.rng.random_range(1..=4),
                false => usize::from(self.rng.random_bool(0.15)),
            };
            for episode in 0..episodes {
                self.emit("connection.staled", vec![connection("stale")]);
                if self.churn && self.rng.random_bool(0.3) {
                    // A status that neither opens nor ends an episode.
                    let other = ["inactive", "paused"][episode % 2];
                    self.emit("connection.created", vec![connection(other)]);
                }
                let last = episode + 1 == episodes;
                if !last || self.rng.random_bool(0.5) {
                    // The fleet re-authenticated: a newer record shows the connection active.
                    self.emit("connection.created", vec![connection("active")]);
                }
            }
        }
        if self.rng.random_bool(0.1) {
            self.emit("share_agreement.updated", vec![share("paused")]);
        }
        if self.rng.random_bool(0.1) {
            // Forward compatibility: an event this version does not handle.
            let id = self.uuid4();
            self.emit(
                "vehicle.added",
                vec![json!({"id": id, "fleet_id": fleet_id, "fleet_ref": fleet_ref})],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_time_ordered() {
        let options = ScenarioOptions::new(50, 7);
        let a = generate(&options);
        let b = generate(&options);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.envelope == y.envelope));
        let names: std::collections::HashSet<_> = a.iter().map(|e| e.event_name.as_str()).collect();
        for name in [
            "invitation.accepted",
            "fleet_connection.created",
            "execution.failed",
        ] {
            assert!(names.contains(name), "{name} missing");
        }
        let deliveries = duplicated_and_shuffled(&a, 0.3, 1);
        assert!(deliveries.len() > a.len());
        let v7 = a[0].id.get_timestamp().unwrap().to_unix().0;
        assert!(v7 as i64 >= options.start.timestamp());
    }
}
