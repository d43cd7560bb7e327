//! Tracing setup: `RUST_LOG` filters, `LOG_FORMAT=text|json` picks the encoder.

use tracing_subscriber::{EnvFilter, fmt};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Install the global subscriber. Safe to call more than once (later calls are no-ops), which
/// matters for tests that start several apps in one process.
pub fn init(format: LogFormat) {
    let filter = with_redaction_caps(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn")),
    );
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// For tests: like [`init`] but through the test harness's captured writer, so logs only show
/// for failing tests.
pub fn init_for_tests() {
    let filter = with_redaction_caps(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=off")),
    );
    let _ = fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Caps that hold whatever `RUST_LOG` says: at debug level tokio-postgres logs statement
/// parameters (magic links, tokens) and reqwest/hyper log request details.
fn with_redaction_caps(filter: EnvFilter) -> EnvFilter {
    [
        "tokio_postgres=info",
        "reqwest=info",
        "hyper=info",
        "hyper_util=info",
    ]
    .into_iter()
    .fold(filter, |f, d| {
        f.add_directive(d.parse().expect("static directive"))
    })
}
