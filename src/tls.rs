//! TLS to RabbitMQ and PostgreSQL, configured in each server's own URL dialect.
//!
//! Operators already know how to write these URLs, so we take the options where the servers'
//! own clients take them instead of inventing environment variables:
//!
//! - **AMQP**: `amqps://` turns TLS on (verified against the system roots). The RabbitMQ URI
//!   query parameters `cacertfile` (PEM roots for a private CA), and `certfile` + `keyfile`
//!   (PEM certificate and PKCS#8 key for client-certificate auth) refine it. The files are read
//!   at every (re)connect, so a rotated certificate is picked up without a restart.
//! - **PostgreSQL**: libpq's `sslmode` and `sslrootcert`. `disable`, `prefer` or no `sslmode`
//!   connect in plain text (TLS is opt-in: a loopback or sidecar deployment should not pay for
//!   it unasked); `require` encrypts without verifying the server, exactly like libpq (and,
//!   like libpq, verifies the chain when `sslrootcert` is given); `verify-ca` checks the chain;
//!   `verify-full` checks the chain and the host name. `sslrootcert` names the only trusted
//!   root (as in libpq); without it the system store is used.
//!
//! Both use the platform's TLS library (OpenSSL on Linux) through `native-tls`: one TLS stack,
//! linked from the system, so security updates come with the OS and the build stays lean.

use std::str::FromStr;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use postgres_native_tls::MakeTlsConnector;

/// The TLS settings for an AMQP URL's `cacertfile`, `certfile` and `keyfile` parameters.
///
/// The default (no parameters) verifies `amqps://` servers against the system roots; for
/// `amqp://` URLs the settings are ignored.
pub fn amqp_tls_config(url: &str) -> std::io::Result<OwnedTLSConfig> {
    let mut config = OwnedTLSConfig::default();
    let mut cert = None;
    let mut key = None;
    for (name, value) in query_pairs(url) {
        match name.as_ref() {
            "cacertfile" => config.cert_chain = Some(read_named(&value, "cacertfile")?),
            "certfile" => cert = Some(read_named(&value, "certfile")?.into_bytes()),
            "keyfile" => key = Some(read_named(&value, "keyfile")?.into_bytes()),
            _ => {}
        }
    }
    match (cert, key) {
        (Some(pem), Some(key)) => config.identity = Some(OwnedIdentity::PKCS8 { pem, key }),
        (None, None) => {}
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "AMQP URL: certfile and keyfile must be given together",
            ));
        }
    }
    Ok(config)
}

/// How (and whether) a PostgreSQL connection is encrypted and verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// `disable`, `prefer` or no `sslmode`: plain text.
    Plain,
    /// `require` without `sslrootcert`: encrypted, server not verified (libpq semantics).
    Require,
    /// `verify-ca` (or `require` with `sslrootcert`): the chain is verified, not the host name.
    VerifyCa,
    /// `verify-full`: chain and host name verified.
    VerifyFull,
}

/// A DATABASE_URL split into what tokio-postgres understands and the TLS connector to use.
pub struct PostgresTarget {
    pub config: tokio_postgres::Config,
    pub mode: SslMode,
    pub tls: Option<MakeTlsConnector>,
}

#[derive(Debug, thiserror::Error)]
pub enum PostgresTlsError {
    #[error("DATABASE_URL: {0}")]
    Url(String),
    #[error("DATABASE_URL sslrootcert: {0}")]
    RootCert(String),
    #[error("TLS setup: {0}")]
    Tls(#[from] native_tls::Error),
}

/// Parse a DATABASE_URL, taking out the libpq options tokio-postgres does not know
/// (`sslmode=verify-ca|verify-full`, `sslrootcert`) and building the matching connector.
pub fn postgres_target(database_url: &str) -> Result<PostgresTarget, PostgresTlsError> {
    let (base, query) = match database_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (database_url, None),
    };
    let mut sslmode = None;
    let mut root_cert = None;
    // The other parameters pass on byte for byte: tokio-postgres has its own decoding rules.
    let mut passed_on = Vec::new();
    for raw in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let Some((name, value)) = form_urlencoded::parse(raw.as_bytes()).next() else {
            continue;
        };
        match name.as_ref() {
            "sslmode" => sslmode = Some(value.into_owned()),
            "sslrootcert" => root_cert = Some(value.into_owned()),
            _ => passed_on.push(raw),
        }
    }
    let mode = match (sslmode.as_deref(), root_cert.is_some()) {
        (None | Some("disable" | "prefer"), _) => SslMode::Plain,
        (Some("require"), false) => SslMode::Require,
        (Some("require" | "verify-ca"), _) => SslMode::VerifyCa,
        (Some("verify-full"), _) => SslMode::VerifyFull,
        (Some(other), _) => {
            return Err(PostgresTlsError::Url(format!(
                "unknown sslmode {other:?} (disable, prefer, require, verify-ca, verify-full)"
            )));
        }
    };
    // tokio-postgres only knows disable/prefer/require; verification is the connector's job.
    let native_mode = match mode {
        SslMode::Plain => "disable",
        _ => "require",
    };
    let sslmode = format!("sslmode={native_mode}");
    passed_on.push(&sslmode);
    let url = format!("{base}?{}", passed_on.join("&"));
    let config =
        tokio_postgres::Config::from_str(&url).map_err(|e| PostgresTlsError::Url(e.to_string()))?;

    let tls = match mode {
        SslMode::Plain => None,
        _ => {
            let mut builder = native_tls::TlsConnector::builder();
            if let Some(path) = &root_cert {
                let pem = std::fs::read(path)
                    .map_err(|e| PostgresTlsError::RootCert(format!("{path}: {e}")))?;
                let cert = native_tls::Certificate::from_pem(&pem)
                    .map_err(|e| PostgresTlsError::RootCert(format!("{path}: {e}")))?;
                // Like libpq: the named root replaces the system store rather than joining it.
                builder.disable_built_in_roots(true);
                builder.add_root_certificate(cert);
            }
            match mode {
                SslMode::Require => {
                    builder.danger_accept_invalid_certs(true);
                    builder.danger_accept_invalid_hostnames(true);
                }
                SslMode::VerifyCa => {
                    builder.danger_accept_invalid_hostnames(true);
                }
                _ => {}
            }
            Some(MakeTlsConnector::new(builder.build()?))
        }
    };
    Ok(PostgresTarget { config, mode, tls })
}

fn query_pairs(url: &str) -> impl Iterator<Item = (String, String)> + '_ {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned()))
}

fn read_named(path: &str, what: &str) -> std::io::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("AMQP URL {what} {path}: {e}")))
}

#[cfg(test)]
mod tests {

    #[test]
    fn several_hosts_and_target_session_attrs_pass_through() {
        let target = postgres_target(
            "postgres://app@db1:5432,db2:5433/catena?target_session_attrs=read-write&sslmode=disable",
        )
        .unwrap();
        assert_eq!(target.config.get_hosts().len(), 2);
        assert_eq!(target.config.get_ports(), [5432, 5433]);
        assert_eq!(
            target.config.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
    }

    use super::*;

    fn mode(url: &str) -> SslMode {
        postgres_target(url).map(|t| t.mode).unwrap()
    }

    #[test]
    fn sslmode_follows_libpq() {
        assert_eq!(mode("postgres://u@h/db"), SslMode::Plain);
        assert_eq!(mode("postgres://u@h/db?sslmode=prefer"), SslMode::Plain);
        assert_eq!(mode("postgres://u@h/db?sslmode=require"), SslMode::Require);
        assert_eq!(
            mode("postgres://u@h/db?sslmode=verify-full"),
            SslMode::VerifyFull
        );
        assert_eq!(
            mode(
                "postgres://u@h/db?sslmode=require&sslrootcert=/etc/ssl/certs/ssl-cert-snakeoil.pem"
            ),
            SslMode::VerifyCa
        );
        assert!(postgres_target("postgres://u@h/db?sslmode=sometimes").is_err());
        assert!(
            postgres_target("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent")
                .is_err()
        );
    }

    #[test]
    fn other_options_reach_tokio_postgres() {
        let target =
            postgres_target("postgres://u@h:6543/db?sslmode=verify-full&application_name=x%20y")
                .unwrap();
        assert_eq!(target.config.get_application_name(), Some("x y"));
        assert_eq!(target.config.get_ports(), &[6543]);
        assert_eq!(target.config.get_dbname(), Some("db"));
        assert_eq!(
            target.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn amqp_client_certificate_needs_both_halves() {
        let err = amqp_tls_config("amqps://h/%2f?certfile=/etc/hostname").unwrap_err();
        assert!(err.to_string().contains("together"), "{err}");
        assert!(amqp_tls_config("amqps://h/%2f?cacertfile=/nonexistent").is_err());
        assert!(
            amqp_tls_config("amqps://h/%2f?heartbeat=10")
                .unwrap()
                .cert_chain
                .is_none()
        );
    }
}
