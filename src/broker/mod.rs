//! RabbitMQ: connections, the confirmed publisher and the topology every process declares.

mod publisher;
pub mod topology;

use lapin::{Connection, ConnectionProperties};

pub use publisher::{PublishError, Publisher};
pub use topology::Names;

/// Connect with a recognisable connection name (shown in the management UI). `amqps://` URLs
/// take their TLS files from the URL (see [`crate::tls`]).
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let tls = crate::tls::amqp_tls_config(url)?;
    Connection::connect_with_config(url, props, tls, lapin::runtime::default_runtime()?).await
}
