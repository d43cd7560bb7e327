//! The local services on a developer's machine: `dev` on local defaults and the test harness
//! start PostgreSQL and RabbitMQ (`scripts/services.sh`, as `scripts/setup.sh` does) when they are
//! installed but not answering, so `cargo run -- dev` and `cargo test` work as the first command
//! typed; when one is missing, the script's one line says what to install.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `host:port` of a URL (`postgres://user@host:port/db`, `amqp://u:p@host:port/vhost`) when the
/// host is this machine; `None` otherwise (remote services are not ours to start).
pub fn local_address(url: &str, default_port: u16) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (host_port, default_port),
    };
    matches!(host, "127.0.0.1" | "localhost" | "[::1]").then(|| format!("{host}:{port}"))
}

fn answers(address: &str) -> bool {
    let Ok(addresses) = address.to_socket_addrs() else {
        return false;
    };
    addresses
        .collect::<Vec<SocketAddr>>()
        .iter()
        .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok())
}

/// Start what does not answer among `addresses` (local ones only) with the checkout's
/// `scripts/services.sh`. The error is one line, fit to print before anything else.
pub fn ensure_services(addresses: &[String]) -> Result<(), String> {
    let silent: Vec<&String> = addresses.iter().filter(|a| !answers(a)).collect();
    if silent.is_empty() {
        return Ok(());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/services.sh");
    if !script.exists() {
        return Err(format!(
            "{} not answering: start PostgreSQL and RabbitMQ (see the README's quick start)",
            silent
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" and ")
        ));
    }
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed");
        return Err(line.trim().to_owned());
    }
    match addresses.iter().find(|a| !answers(a)) {
        None => Ok(()),
        Some(still) => Err(format!(
            "{still} still not answering after scripts/services.sh"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_urls_are_ours() {
        assert_eq!(
            local_address("postgres://postgres@127.0.0.1:5432/catena", 5432).as_deref(),
            Some("127.0.0.1:5432")
        );
        assert_eq!(
            local_address("amqp://guest:guest@localhost/%2f", 5672).as_deref(),
            Some("localhost:5672")
        );
        assert_eq!(
            local_address("postgres://db.internal:5432/catena", 5432),
            None
        );
        assert_eq!(local_address("not a url", 1), None);
    }
}
