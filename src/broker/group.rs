//! The relay's event publisher: a group publish over the confirmed [`Publisher`].
//!
//! Each of `lanes` tasks carries one broker message at a time. A request waits in a queue until
//! a lane is free; the lane takes every request waiting then (up to `max_events` and
//! `max_bytes`), publishes them as one message and answers each request with that message's
//! confirm. At low load a lane is free when a request arrives, so it travels alone and at
//! once; under load, the requests that arrive during one confirm share the next message, and
//! the broker's per-message cost (routing, the quorum log, the confirm) is paid once per group
//! instead of once per event. Nothing waits for a group to fill.
//!
//! A request is answered `Ok` only after the broker confirmed the message that carries it, and
//! an error if that message was nacked, returned or not confirmed in time: the relay answers
//! 202 or 503 accordingly, and Catena retries a 503. A request whose caller has gone (its
//! deadline passed while it queued) is not published at all.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use prometheus::Histogram;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::topology::{EventRouting, Names};
use super::{PublishError, Publisher};
use crate::message::{self, EventMeta, Producer};

/// An event body the publisher may hold until its message is confirmed.
pub type EventBody = Box<dyn AsRef<[u8]> + Send + Sync>;

/// How the requests are grouped.
#[derive(Clone, Copy, Debug)]
pub struct GroupSettings {
    /// Messages in flight at once (one per lane).
    pub lanes: usize,
    pub max_events: usize,
    pub max_bytes: usize,
    /// How long a request may wait for its confirm, queueing included.
    pub deadline: Duration,
    /// The `app_id` of the messages.
    pub producer: Producer,
}

struct Pending {
    meta: EventMeta<'static>,
    body: EventBody,
    done: oneshot::Sender<Result<(), PublishError>>,
}

impl Pending {
    fn len(&self) -> usize {
        (*self.body).as_ref().len()
    }
}

/// The queue the lanes take from, and the one request that did not fit the last group.
struct Queue {
    receiver: mpsc::Receiver<Pending>,
    held_over: Option<Pending>,
}

#[derive(Clone)]
pub struct EventPublisher {
    sender: mpsc::Sender<Pending>,
    deadline: Duration,
}

impl EventPublisher {
    /// Start the lanes over `publisher`. `group_size` observes the events of each message.
    pub fn start(
        publisher: Publisher,
        names: Names,
        settings: GroupSettings,
        group_size: Option<Histogram>,
    ) -> Self {
        let max_events = match names.routing {
            // Other consumers bind by event name: each message is one event under its name.
            EventRouting::Topic => 1,
            EventRouting::Queue => settings.max_events.max(1),
        };
        // Bounded only as a backstop: the relay's own concurrency limit bounds what waits here.
        let (sender, receiver) = mpsc::channel(64 * 1024);
        let queue = Arc::new(Mutex::new(Queue {
            receiver,
            held_over: None,
        }));
        let lane = Arc::new(Lane {
            publisher,
            names,
            max_events,
            max_bytes: settings.max_bytes,
            deadline: settings.deadline,
            producer: settings.producer,
            group_size,
        });
        for _ in 0..lane_count(settings.lanes, max_events) {
            tokio::spawn(lane.clone().run(queue.clone()));
        }
        Self {
            sender,
            deadline: settings.deadline,
        }
    }

    /// Publish one event; `Ok` once the broker confirmed the message that carries it.
    pub async fn publish(
        &self,
        meta: EventMeta<'static>,
        body: EventBody,
    ) -> Result<(), PublishError> {
        let (done, answer) = oneshot::channel();
        self.sender
            .send(Pending { meta, body, done })
            .await
            .map_err(|_| PublishError::Unavailable)?;
        match tokio::time::timeout(self.deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PublishError::Unavailable),
            Err(_) => Err(PublishError::ConfirmTimeout(self.deadline)),
        }
    }
}

/// Messages of one event each gain nothing from waiting for a lane: one lane per channel would
/// cap the relay at `lanes` confirms per round trip (measured: ~1.5-2k requests/s). Without
/// grouping (the topic opt-in, `RELAY_GROUP_MAX_EVENTS=1`) confirms are pipelined instead, as
/// many in flight per channel as a group would carry events.
const UNGROUPED_DEPTH: usize = 64;

fn lane_count(lanes: usize, max_events: usize) -> usize {
    if max_events <= 1 {
        lanes.max(1) * UNGROUPED_DEPTH
    } else {
        lanes.max(1)
    }
}

struct Lane {
    publisher: Publisher,
    names: Names,
    max_events: usize,
    max_bytes: usize,
    deadline: Duration,
    producer: Producer,
    group_size: Option<Histogram>,
}

impl Lane {
    async fn run(self: Arc<Self>, queue: Arc<Mutex<Queue>>) {
        let mut group = Vec::with_capacity(self.max_events);
        loop {
            if !self.take(&queue, &mut group).await {
                return; // every sender is gone: the relay is stopping
            }
            // Callers that gave up (deadline passed while queued) were answered 503 already;
            // publishing them would only make a duplicate.
            group.retain(|p: &Pending| !p.done.is_closed());
            if group.is_empty() {
                continue;
            }
            let result = self.publish(&group).await;
            for pending in group.drain(..) {
                let _ = pending.done.send(match &result {
                    Ok(()) => Ok(()),
                    Err(error) => Err(error.duplicate()),
                });
            }
        }
    }

    /// Wait for one request, then take those already waiting, up to the limits.
    async fn take(&self, queue: &Mutex<Queue>, group: &mut Vec<Pending>) -> bool {
        let mut queue = queue.lock().await;
        let first = match queue.held_over.take() {
            Some(pending) => pending,
            None => match queue.receiver.recv().await {
                Some(pending) => pending,
                None => return false,
            },
        };
        let mut bytes = first.len();
        group.push(first);
        while group.len() < self.max_events {
            let Ok(next) = queue.receiver.try_recv() else {
                break;
            };
            if bytes + next.len() > self.max_bytes {
                queue.held_over = Some(next);
                break;
            }
            bytes += next.len();
            group.push(next);
        }
        true
    }

    async fn publish(&self, group: &[Pending]) -> Result<(), PublishError> {
        if let Some(histogram) = &self.group_size {
            histogram.observe(group.len() as f64);
        }
        if let [single] = group {
            let event_type = single.meta.event_type.as_deref().unwrap_or_default();
            let (exchange, routing_key) = self.names.route(event_type);
            let properties = message::event_properties(&single.meta, self.producer);
            return self
                .publisher
                .publish(
                    exchange,
                    routing_key,
                    (*single.body).as_ref(),
                    properties,
                    self.deadline,
                )
                .await;
        }
        let body = message::encode_group(group.iter().map(|p| (&p.meta, (*p.body).as_ref())));
        let received_at = group
            .iter()
            .filter_map(|p| p.meta.received_at)
            .min()
            .unwrap_or_else(Utc::now);
        let properties = message::group_properties(received_at, self.producer);
        let (exchange, routing_key) = self.names.route(message::GROUP_TYPE);
        self.publisher
            .publish(exchange, routing_key, &body, properties, self.deadline)
            .await
    }
}
