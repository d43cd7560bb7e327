//! `fake-catena`: an in-memory stand-in for Catena's webhook-subscription API and its webhook
//! delivery, for the integration tests and the demo (catena-control-plane.md §3).
//!
//! - [`api`]: the Keycloak token endpoint and the subscription API under
//!   [`WEBHOOKS_PATH`](crate::catena::model::WEBHOOKS_PATH), on the wire types of
//!   [`crate::catena::model`], so our client and the fake cannot drift apart.
//! - [`delivery`]: a queue per subscription, signed gzipped POSTs, retries, the DLQ and replay.
//! - [`health`]: message outcomes, EWMA, metrics and the S4 breaker.
//! - [`faults`]: injected answers and the rate limit; [`hooks`]: `/_fake/*` for tests.
//! - [`config`]: every knob ([`FakeConfig`]), changeable while running.
//!
//! Tests start it on `127.0.0.1:0` with [`start`] and drive it through the [`Fake`] handle.

mod api;
pub mod config;
mod delivery;
mod errors;
mod faults;
mod health;
mod hooks;
mod names;
mod pagination;
mod state;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use chrono::Utc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::FakeConfig;
pub use state::{Call, Fake, LedgerEntry};

use crate::catena::model::{TOKEN_PATH, WEBHOOKS_PATH};
use crate::shutdown::Shutdown;

/// A fake serving until its [`Shutdown`] triggers.
pub struct RunningFake {
    pub addr: SocketAddr,
    pub handle: JoinHandle<()>,
    pub fake: Fake,
}

impl RunningFake {
    /// What `CATENA_API_URL` should be.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What `CATENA_AUTH_URL` should be: the token endpoint on the same listener.
    pub fn auth_url(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.addr)
    }

    /// Our client's settings for this fake: its URLs and its (development) credentials.
    pub fn catena_settings(&self) -> crate::config::CatenaSettings {
        let config = self.fake.config();
        crate::config::CatenaSettings {
            api_url: self.api_url(),
            auth_url: self.auth_url(),
            client_id: config.client_id,
            client_secret: config.client_secret,
        }
    }
}

/// Bind `listen` and serve the API, the token endpoint and the hooks until `shutdown`; delivery
/// tasks stop with it too.
pub async fn start(
    listen: &str,
    config: FakeConfig,
    shutdown: Shutdown,
) -> std::io::Result<RunningFake> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let fake = Fake::new(config, shutdown.clone());
    let app = router(fake.clone());
    let handle = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "fake-catena: serving failed");
        }
        tracing::info!("fake-catena stopped");
    });
    tracing::info!(%addr, "fake-catena listening");
    Ok(RunningFake { addr, handle, fake })
}

fn router(fake: Fake) -> Router {
    let one = format!("{WEBHOOKS_PATH}/{{id}}");
    Router::new()
        .route(TOKEN_PATH, post(api::token))
        .route(WEBHOOKS_PATH, post(api::create).get(api::list))
        .route(
            &format!("{WEBHOOKS_PATH}/"),
            post(api::create).get(api::list),
        )
        .route(&one, get(api::get).patch(api::patch).delete(api::delete))
        .route(&format!("{one}/activate"), post(api::activate))
        .route(&format!("{one}/pause"), post(api::pause))
        .route(&format!("{one}/replay"), post(api::replay))
        .route(&format!("{one}/metrics"), get(api::metrics))
        .route(&format!("{one}/logs"), get(api::logs))
        .route("/_fake/emit", post(hooks::emit))
        .route("/_fake/scenario", post(hooks::scenario))
        .route("/_fake/ledger", get(hooks::ledger))
        .route("/_fake/dlq/{id}", get(hooks::dlq))
        .route("/_fake/calls", get(hooks::calls))
        .route(
            "/_fake/config",
            put(hooks::put_config).get(hooks::get_config),
        )
        .layer(middleware::from_fn_with_state(fake.clone(), gate))
        .with_state(fake)
}

/// Around every call: injected faults first (never on the hooks), then the record in `calls`.
async fn gate(State(fake): State<Fake>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let fault = if path.starts_with("/_fake/") {
        None
    } else {
        fake.injected_fault(&method, &path)
    };
    let response = match fault {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    };
    fake.lock().calls.push(Call {
        at: Utc::now(),
        method,
        path,
        status: response.status().as_u16(),
    });
    response
}
