//! RabbitMQ: connections, the confirmed publisher and the topology every process declares.

mod group;
mod publisher;
pub mod topology;

use lapin::{Connection, ConnectionProperties};

pub use group::{EventBody, EventPublisher, GroupSettings};
pub use publisher::{PublishError, Publisher};
pub use topology::{EventRouting, Names};

/// Connect with a recognisable connection name (shown in the management UI). `amqps://` URLs
/// take their TLS files from the URL (see [`crate::tls`]).
///
/// `AMQP_URL` may list several nodes of a cluster, comma separated (as other clients take a list
/// of addresses). Each call starts at the node after the one the previous call started at and
/// tries every one in turn, so a process whose node went away reconnects (with its usual backoff)
/// to another, and processes spread over the nodes.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let urls = node_urls(url);
    let start = NEXT_NODE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut last_error = None;
    for offset in 0..urls.len() {
        let node = urls[(start + offset) % urls.len()];
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let tls = crate::tls::amqp_tls_config(node)?;
        match Connection::connect_with_config(node, props, tls, lapin::runtime::default_runtime()?)
            .await
        {
            Ok(connection) => return Ok(connection),
            Err(error) => {
                if urls.len() > 1 {
                    tracing::debug!(node = offset, %error, "broker node unreachable, trying the next");
                }
                last_error = Some(error);
            }
        }
    }
    Err(last_error.expect("at least one URL"))
}

/// Where the next [`connect`] starts in the list of nodes.
static NEXT_NODE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The node URLs of `AMQP_URL` (one, or several comma separated).
pub fn node_urls(url: &str) -> Vec<&str> {
    let urls: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() { vec![url] } else { urls }
}

#[cfg(test)]
mod tests {
    #[test]
    fn several_nodes_are_split() {
        assert_eq!(
            super::node_urls("amqp://a:5672/%2f, amqp://b:5672/%2f,"),
            ["amqp://a:5672/%2f", "amqp://b:5672/%2f"]
        );
        assert_eq!(super::node_urls("amqp://a/%2f"), ["amqp://a/%2f"]);
    }
}
