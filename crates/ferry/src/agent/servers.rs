//! The agent's HTTP servers: `/healthz` and `/livez` on healthzBindAddress,
//! `/metrics` on metricsBindAddress.
//!
//! A port that cannot be bound stops the agent when bindAddressHardFail is
//! set; otherwise it is logged and retried every five seconds, as kube-proxy
//! does, so a slow-to-free port does not keep the proxy down.

use super::metrics::{CodeLabels, Metrics};
use crate::health::ProxyHealth;
use crate::health::service_health::{bind, bind_any};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How often a port that could not be bound is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// `/healthz` and `/livez`, counting answers by status code as kube-proxy does.
pub fn health_router(health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> axum::Router {
    let (h, m) = (health.clone(), metrics.clone());
    axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let (h, m) = (h.clone(), m.clone());
                async move { counted(&m.healthz_total, h.healthz()) }
            }),
        )
        .route(
            "/livez",
            get(move || {
                let (h, m) = (health.clone(), metrics.clone());
                async move { counted(&m.livez_total, h.livez()) }
            }),
        )
}

fn counted(
    family: &prometheus_client::metrics::family::Family<CodeLabels, prometheus_client::metrics::counter::Counter>,
    r: Response,
) -> Response {
    family.get_or_create(&CodeLabels { code: r.status().as_u16().to_string() }).inc();
    r
}

/// `/metrics` in the OpenMetrics text format.
pub fn metrics_router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                let mut r = m.render().into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                );
                r
            }
        }),
    )
}

/// Binds like Go's `net.Listen("tcp", addr)`: an unspecified address of
/// either family listens on both (`0.0.0.0:10256` answers on IPv6 too).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let std = if addr.ip().is_unspecified() { bind_any(addr.port())? } else { bind(addr, false)? };
    tokio::net::TcpListener::from_std(std)
}

/// Serves `app` on `addr` in the background. `what` and `key` name the server
/// and its setting in messages.
pub fn serve(
    what: &'static str,
    key: &'static str,
    addr: SocketAddr,
    app: axum::Router,
    hard_fail: bool,
) -> anyhow::Result<()> {
    let listener = match listen(addr) {
        Ok(l) => Some(l),
        Err(e) if hard_fail => {
            anyhow::bail!(
                "cannot serve {what} on {addr}: {e}; free the port or change {key} \
                 (bindAddressHardFail is set, so this stops the agent)"
            )
        }
        Err(e) => {
            tracing::error!(
                "cannot serve {what} on {addr}: {e}; retrying every {RETRY:?} (free the port or change {key})"
            );
            None
        }
    };
    tokio::spawn(async move {
        let listener = match listener {
            Some(l) => l,
            None => loop {
                tokio::time::sleep(RETRY).await;
                match listen(addr) {
                    Ok(l) => break l,
                    Err(e) => tracing::debug!("{what} on {addr} still cannot bind: {e}"),
                }
            },
        };
        tracing::info!("serving {what} on {addr}");
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the {what} server on {addr} stopped: {e}");
        }
    });
    Ok(())
}
