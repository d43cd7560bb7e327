//! TLS to the dependencies, against the real servers.
//!
//! PostgreSQL speaks TLS itself here (the Debian cluster serves its snakeoil certificate, for
//! `localhost`). RabbitMQ has no TLS listener on this machine, and reconfiguring the machine's
//! broker is not a test's business, so the test puts a TLS terminator of its own, with a CA it
//! generates, in front of the real broker: the client side (lapin, `amqps://`, `cacertfile`)
//! is exactly what production runs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use catena_ingest::broker;
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::db::{self, migrate};
use crate::helpers::*;

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it, made with the
/// openssl command line.
struct TestPki {
    dir: TempDir,
}

impl TestPki {
    fn generate() -> Self {
        let dir = TempDir::new("pki");
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir.path)
                .output()
                .expect("openssl is installed");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        std::fs::write(
            dir.path.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        #[rustfmt::skip]
        openssl(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=catena test CA"]);
        #[rustfmt::skip]
        openssl(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
        #[rustfmt::skip]
        openssl(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext"]);
        Self { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path.join(file).to_str().unwrap().to_owned()
    }
}

/// TLS in front of the real broker: accepts TLS, forwards the plain bytes to 127.0.0.1:5672.
struct TlsTerminator {
    port: u16,
    handshakes: Arc<AtomicUsize>,
}

impl TlsTerminator {
    async fn start(pki: &TestPki) -> Self {
        let cert = std::fs::read(pki.path("server.pem")).unwrap();
        let key = std::fs::read(pki.path("server.key")).unwrap();
        let identity = native_tls::Identity::from_pkcs8(&cert, &key).unwrap();
        let acceptor =
            tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(inbound).await else {
                        return; // a client that refused our certificate
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut broker) = TcpStream::connect(broker_addr()).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                });
            }
        });
        Self { port, handshakes }
    }

    fn url(&self, query: &str) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f{query}", self.port)
    }
}

/// The certificate the local PostgreSQL serves (asserting that it serves TLS at all).
async fn postgres_server_cert() -> String {
    let admin = db::admin().await;
    let ssl: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    assert_eq!(
        ssl, "on",
        "the local PostgreSQL must serve TLS for this test"
    );
    let file: String = admin
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .unwrap()
        .get(0);
    assert!(Path::new(&file).exists(), "{file}");
    file
}

/// Whether a pool built from `database_url` gets an encrypted connection.
async fn pool_encrypts(database_url: &str) -> bool {
    let pool = db::pool(database_url, 1).unwrap();
    let client = pool.get().await.unwrap();
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn tls_db_url(host: &str, name: &str, query: &str) -> String {
    format!("postgres://postgres@{host}:5432/{name}?{query}")
}

/// (encrypted, total) connections of our pool to `database`.
async fn pool_connections_encrypted(database: &str) -> (i64, i64) {
    let row = db::admin()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.datname = $1 AND a.application_name = 'catena-ingest'",
            &[&database],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn the_whole_pipeline_runs_over_verified_tls() {
    let pki = TestPki::generate();
    let terminator = TlsTerminator::start(&pki).await;
    let root = postgres_server_cert().await;
    let amqps = terminator.url(&format!("?cacertfile={}", pki.path("ca.pem")));

    // The worker migrates (a connection outside the pool) and then applies over the pool.
    let builder = TestPipeline::builder("tls").unmigrated_database();
    let verified_db = tls_db_url(
        "localhost",
        builder.name(),
        &format!("sslmode=verify-full&sslrootcert={root}"),
    );
    let p = builder
        .relay_config(|config| config.broker.amqp_url = amqps.clone())
        .worker_config(|config| {
            config.worker.consumers = 2;
            config.broker.amqp_url = amqps.clone();
            config.database.database_url = verified_db;
        })
        .start()
        .await;
    let events = scenario(10, 11);
    let report = p.send_deliveries(&events, &in_order(&events), 8).await;
    assert_eq!(report.accepted as usize, events.len(), "{report:?}");
    // Counted over plain text.
    let applied = p
        .wait_for_applied(events.len(), Duration::from_secs(60))
        .await;
    assert_eq!(applied, events.len(), "every event applied over TLS");

    let (encrypted, total) = pool_connections_encrypted(&p.db().name).await;
    assert!(total >= 1, "the worker's pool is connected");
    assert_eq!(encrypted, total, "every pool connection is encrypted");
    assert!(
        terminator.handshakes.load(Ordering::SeqCst) >= 2,
        "relay and worker reached the broker through TLS"
    );
    p.stop().await;
}

#[tokio::test]
async fn verification_refuses_the_wrong_server_and_plain_stays_plain() {
    let pki = TestPki::generate();
    let terminator = TlsTerminator::start(&pki).await;
    let root = postgres_server_cert().await;
    let db = TestDb::reserve(unique("tlsv"));
    let name = &db.name;

    // AMQP: our CA is in no system store, so without cacertfile the broker is refused.
    let refused = broker::connect(&terminator.url(""), "tls test").await;
    assert!(
        refused.is_err(),
        "an unverifiable broker certificate is refused"
    );
    let accepted = broker::connect(
        &terminator.url(&format!("?cacertfile={}", pki.path("ca.pem"))),
        "tls test",
    )
    .await
    .expect("the same broker with its CA given");
    drop(accepted);

    // PostgreSQL: the server's certificate names localhost, not 127.0.0.1.
    let wrong_host = tls_db_url(
        "127.0.0.1",
        name,
        &format!("sslmode=verify-full&sslrootcert={root}"),
    );
    assert!(migrate(&wrong_host).await.is_err());
    let wrong_ca = tls_db_url(
        "localhost",
        name,
        &format!("sslmode=verify-ca&sslrootcert={}", pki.path("ca.pem")),
    );
    assert!(migrate(&wrong_ca).await.is_err());
    // verify-ca checks the chain only, so the IP address is fine with the right root...
    let chain_only = tls_db_url(
        "127.0.0.1",
        name,
        &format!("sslmode=verify-ca&sslrootcert={root}"),
    );
    migrate(&chain_only)
        .await
        .expect("verify-ca with the server's root");
    // ...and require encrypts without verifying, as libpq does.
    let require = tls_db_url("127.0.0.1", name, "sslmode=require");
    assert!(pool_encrypts(&require).await, "sslmode=require encrypts");
    // No sslmode: plain text, as documented (TLS is opt-in).
    assert!(!pool_encrypts(&db.url).await, "no sslmode means plain text");
}
