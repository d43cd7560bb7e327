//! One consumer: its own connection and channel with a prefetch window, gathering batches,
//! handing them to [`super::batch`] and settling them only after the commit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use super::batch::{self, Context, Disposition};
use super::{Health, WorkerConfig};
use crate::metrics::{Stage, WorkerMetrics};
use crate::retry::Reconnect;
use crate::shutdown::Shutdown;
use crate::{broker, message};

async fn open_consumer(
    config: &WorkerConfig,
    index: usize,
) -> lapin::Result<(Connection, Channel, Consumer)> {
    let connection = broker::connect(
        &config.broker.amqp_url,
        &format!("catena-ingest worker consumer {index}"),
    )
    .await?;
    let names = config.broker.names();
    broker::topology::declare(&connection, &names).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(config.worker.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            names.events_queue.as_str().into(),
            format!("catena-ingest-{}-{index}", std::process::id())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, consumer))
}

enum Gathered {
    Batch(Vec<Delivery>),
    Shutdown,
    Broken,
}

async fn gather(
    consumer: &mut Consumer,
    config: &WorkerConfig,
    shutdown: &Shutdown,
    metrics: &WorkerMetrics,
) -> Gathered {
    let idle = Instant::now();
    let first = tokio::select! {
        _ = shutdown.wait() => return Gathered::Shutdown,
        next = consumer.next() => match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => {
                tracing::warn!(%error, "consumer error");
                return Gathered::Broken;
            }
            None => return Gathered::Broken,
        },
    };
    let gathering = Instant::now();
    metrics.stage(Stage::Idle, gathering - idle);
    // The batch size counts events: a group message carries many.
    let mut events = message::events_in(&first.properties, &first.data);
    let mut batch = Vec::with_capacity(config.worker.batch_size.min(1024));
    batch.push(first);
    let deadline = tokio::time::Instant::now() + config.worker.batch_wait;
    while events < config.worker.batch_size {
        // Take what is already buffered without waiting; then wait up to the deadline.
        let next = match consumer.next().now_or_never() {
            Some(next) => next,
            None if config.worker.batch_wait.is_zero() => break,
            None => match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        match next {
            Some(Ok(delivery)) => {
                events += message::events_in(&delivery.properties, &delivery.data);
                batch.push(delivery);
            }
            _ => break,
        }
    }
    metrics.stage(Stage::Gather, gathering.elapsed());
    Gathered::Batch(batch)
}

/// Ack everything with one multiple-ack when the whole batch is done; otherwise settle each.
async fn settle(
    channel: &Channel,
    batch: &[Delivery],
    dispositions: &[Disposition],
) -> lapin::Result<()> {
    if dispositions.iter().all(|d| *d == Disposition::Ack) {
        let last = batch.last().expect("batches are never empty").delivery_tag;
        return channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await;
    }
    for (delivery, disposition) in batch.iter().zip(dispositions) {
        match disposition {
            Disposition::Ack => {
                channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                    .await?
            }
            Disposition::Requeue => {
                channel
                    .basic_nack(
                        delivery.delivery_tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .await?
            }
        }
    }
    Ok(())
}

pub(super) async fn consume(
    index: usize,
    config: WorkerConfig,
    ctx: Arc<Context>,
    health: Arc<Health>,
) {
    let mut pacing = Reconnect::default();
    while !ctx.shutdown.is_triggered() {
        // A message that cannot apply is rerouted through the publisher; without it, it could
        // only go back to the queue (and its good neighbours with it). Consume once it is up.
        while !ctx.publisher.is_ready() {
            tokio::select! {
                _ = ctx.shutdown.wait() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let (connection, channel, mut consumer) = match open_consumer(&config, index).await {
            Ok(opened) => opened,
            Err(error) => {
                let wait = pacing.down();
                tracing::warn!(consumer = index, %error, retry_in = ?wait, "cannot consume, retrying");
                tokio::select! {
                    _ = ctx.shutdown.wait() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        pacing.up();
        health.consuming.fetch_add(1, Ordering::Relaxed);
        tracing::info!(consumer = index, queue = %config.broker.names().events_queue, "consuming");
        loop {
            let batch = match gather(&mut consumer, &config, &ctx.shutdown, &ctx.metrics).await {
                Gathered::Batch(batch) => batch,
                Gathered::Shutdown | Gathered::Broken => break,
            };
            ctx.metrics.inflight.add(batch.len() as i64);
            let dispositions = batch::process(&ctx, &batch).await;
            let settling = Instant::now();
            let settled = settle(&channel, &batch, &dispositions).await;
            ctx.metrics.stage(Stage::Settle, settling.elapsed());
            ctx.metrics.inflight.sub(batch.len() as i64);
            if let Err(error) = settled {
                // Committed but not acked: the broker redelivers and dedup makes it a no-op.
                tracing::warn!(consumer = index, %error, "ack failed, reconnecting");
                break;
            }
        }
        health.consuming.fetch_sub(1, Ordering::Relaxed);
        // Unacked prefetched messages return to the queue when the channel closes.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            connection.close(200, "consumer stopping".into()),
        )
        .await;
        if ctx.shutdown.is_triggered() {
            break;
        }
        let wait = pacing.down();
        tracing::warn!(consumer = index, retry_in = ?wait, "consumer lost, reconnecting");
        tokio::select! {
            _ = ctx.shutdown.wait() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!(consumer = index, "consumer stopped");
}
