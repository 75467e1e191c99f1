//! The HTTP API (axum), bound to 127.0.0.1 by default:
//! - `GET /metrics`: Prometheus text;
//! - `GET /healthz`: 200 while the process serves;
//! - `GET /readyz`: 200 once every camera has its model and the broker is connected, else 503 with reasons;
//! - `GET /v1/frames/{id}` (the stored verdict JSON), `/v1/frames/{id}/image` and `/v1/frames/{id}/overlay` (JPEG).
//!   An id that is not a frame id gets 400; one that is not stored gets 404.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::daemon::message::valid_frame_id;
use crate::sink::store::{Part, Store};
use crate::telemetry::Metrics;

/// Readiness: `Ok(())` or the reasons for not being ready.
pub type ReadyFn = Arc<dyn Fn() -> Result<(), Vec<String>> + Send + Sync>;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub store: Option<Arc<Store>>,
    pub ready: ReadyFn,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/frames/:id", get(|s, p| frame(s, p, Part::Verdict)))
        .route("/v1/frames/:id/image", get(|s, p| frame(s, p, Part::Image)))
        .route("/v1/frames/:id/overlay", get(|s, p| frame(s, p, Part::Overlay)))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.encode()).into_response()
}

async fn readyz(State(s): State<HttpState>) -> Response {
    match (s.ready)() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reasons) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; "))).into_response()
        }
    }
}

async fn frame(State(s): State<HttpState>, Path(id): Path<String>, part: Part) -> Response {
    if !valid_frame_id(&id) {
        return (StatusCode::BAD_REQUEST, "not a frame id: letters, digits, '-', '_' and '.' only\n").into_response();
    }
    let Some(store) = s.store.clone() else {
        return (StatusCode::NOT_FOUND, "the flagged-frame store is off (store.dir = \"\")\n").into_response();
    };
    let found = tokio::task::spawn_blocking(move || store.get(&id, part)).await.ok().flatten();
    match found {
        Some(bytes) => ([(header::CONTENT_TYPE, part.content_type())], bytes).into_response(),
        None => (StatusCode::NOT_FOUND, "no such stored frame (only NG frames are kept, oldest deleted first)\n")
            .into_response(),
    }
}

/// Binds the listener; the error names the address.
pub async fn bind(addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr), String> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on http.listen = {addr:?}: {e}"))?;
    let a = l.local_addr().map_err(|e| e.to_string())?;
    Ok((l, a))
}
