//! The confirmed publisher: a supervised broker session shared by every request.
//!
//! One connection with a few confirm-mode channels, used round-robin. A supervisor task
//! (re)connects with exponential backoff and re-declares the topology. `is_ready` drives
//! `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Notify;

use super::connect;
use super::topology::{self, Names};
use crate::retry::Reconnect;
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker connection not available")]
    Unavailable,
    #[error("broker nacked the message")]
    Nacked,
    #[error("message was unroutable and returned by the broker")]
    Unroutable,
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// A [`PublishError::Broker`] passed on to another request of the same group message.
    #[error("broker error: {0}")]
    BrokerShared(String),
}

impl PublishError {
    /// The same failure for another request carried by the same message (lapin's error is not
    /// `Clone`).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            PublishError::Unavailable => PublishError::Unavailable,
            PublishError::Nacked => PublishError::Nacked,
            PublishError::Unroutable => PublishError::Unroutable,
            PublishError::ConfirmTimeout(d) => PublishError::ConfirmTimeout(*d),
            PublishError::Broker(e) => PublishError::BrokerShared(e.to_string()),
            PublishError::BrokerShared(e) => PublishError::BrokerShared(e.clone()),
        }
    }
}

struct Session {
    connection: Connection,
    channels: Vec<Channel>,
    /// Set when a confirm never came: the connection may still look connected (a black-holed
    /// broker), but this session is done.
    broken: AtomicBool,
}

impl Session {
    fn healthy(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && self.connection.status().connected()
            && self.channels.iter().all(|c| c.status().connected())
    }
}

struct Inner {
    url: String,
    conn_name: String,
    names: Names,
    channel_count: usize,
    session: RwLock<Option<Arc<Session>>>,
    next: AtomicUsize,
    broken: Notify,
}

#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

impl Publisher {
    /// Start the supervisor; the first connection is attempted in the background, so a relay
    /// can come up (not ready) before the broker does.
    pub fn start(
        url: &str,
        conn_name: &str,
        names: Names,
        channel_count: usize,
        shutdown: Shutdown,
    ) -> Self {
        let inner = Arc::new(Inner {
            url: url.to_owned(),
            conn_name: conn_name.to_owned(),
            names,
            channel_count: channel_count.max(1),
            session: RwLock::new(None),
            next: AtomicUsize::new(0),
            broken: Notify::new(),
        });
        tokio::spawn(supervise(inner.clone(), shutdown));
        Self { inner }
    }

    pub fn is_ready(&self) -> bool {
        self.session().is_some_and(|s| s.healthy())
    }

    /// Wait until the first session is up, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.is_ready() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.is_ready()
    }

    fn session(&self) -> Option<Arc<Session>> {
        self.inner
            .session
            .read()
            .expect("session lock poisoned")
            .clone()
    }

    /// Messages ready in `queue` (passive declare on a short-lived channel, so a missing queue
    /// cannot close a publishing channel).
    pub async fn queue_depth(&self, queue: &str) -> Option<u32> {
        let session = self.session()?;
        let channel = session.connection.create_channel().await.ok()?;
        let declared = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .ok();
        let _ = channel.close(200, "done".into()).await;
        declared.map(|q| q.message_count())
    }

    /// Publish persistently with `mandatory` and wait for the confirm, up to `deadline`.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        deadline: Duration,
    ) -> Result<(), PublishError> {
        let session = self.session().ok_or(PublishError::Unavailable)?;
        let index = self.inner.next.fetch_add(1, Ordering::Relaxed) % session.channels.len();
        let channel = &session.channels[index];
        let properties = properties.with_delivery_mode(2);
        let outcome = tokio::time::timeout(deadline, async {
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    properties,
                )
                .await?
                .await
        })
        .await;
        match outcome {
            Err(_) => {
                session.broken.store(true, Ordering::Relaxed);
                self.inner.broken.notify_one();
                Err(PublishError::ConfirmTimeout(deadline))
            }
            Ok(Err(e)) => {
                self.inner.broken.notify_one();
                Err(PublishError::Broker(e))
            }
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Unroutable),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => unreachable!("channels are in confirm mode"),
        }
    }
}

async fn open_session(inner: &Inner) -> lapin::Result<Session> {
    let connection = connect(&inner.url, &inner.conn_name).await?;
    topology::declare(&connection, &inner.names).await?;
    let mut channels = Vec::with_capacity(inner.channel_count);
    for _ in 0..inner.channel_count {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }
    Ok(Session {
        connection,
        channels,
        broken: AtomicBool::new(false),
    })
}

async fn supervise(inner: Arc<Inner>, shutdown: Shutdown) {
    let mut pacing = Reconnect::default();
    loop {
        let attempt = tokio::select! {
            _ = shutdown.wait() => break,
            s = open_session(&inner) => s,
        };
        let wait = match attempt {
            Ok(session) => {
                pacing.up();
                tracing::info!(connection = %inner.conn_name, "broker session ready");
                let session = Arc::new(session);
                *inner.session.write().expect("session lock poisoned") = Some(session.clone());
                // Watch for loss: a failed publish wakes us at once, the poll catches idle loss.
                loop {
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = inner.broken.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    if !session.healthy() {
                        break;
                    }
                }
                *inner.session.write().expect("session lock poisoned") = None;
                if shutdown.is_triggered() {
                    let _ = session.connection.close(200, "shutdown".into()).await;
                    break;
                }
                let wait = pacing.down();
                tracing::warn!(connection = %inner.conn_name, retry_in = ?wait, "broker session lost, reconnecting");
                // A black-holed broker never answers the close: do not wait for it.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        session.connection.close(320, "reconnecting".into()),
                    )
                    .await;
                });
                wait
            }
            Err(error) => {
                let wait = pacing.down();
                tracing::warn!(%error, retry_in = ?wait, "broker connect failed");
                wait
            }
        };
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
