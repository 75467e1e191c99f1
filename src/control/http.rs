//! The HTTP API (axum), bound to 127.0.0.1 by default:
//! - `GET /metrics`: Prometheus text;
//! - `GET /healthz`: 200 while the process serves;
//! - `GET /readyz`: 200 once every camera has its model and the broker is connected, else 503 with reasons;
//! - `GET /v1/frames?camera=&product=&verdict=&limit=`: the stored frames, newest first, as verdict summaries
//!   filtered by camera, product (recipe) and verdict (limit 1-500, default 50; the newest 2,000 are searched).
//! - `GET /v1/frames/{id}` (the stored verdict JSON), `/v1/frames/{id}/image` and `/v1/frames/{id}/overlay` (JPEG).
//!   An id that is not a frame id gets 400; one that is not stored gets 404.
//! - `POST /v1/frames/{id}/chat` (`{"question":"Where exactly?"}`) asks about an NG frame and answers
//!   with the model's checked answer (or the template's), keeping the conversation;
//!   `GET /v1/frames/{id}/chat` shows the conversation so far. Asking needs the token, as writes do.
//! - `GET /v1/cameras/{camera}/enrolments`: what line mode learned (versions, the active one, history);
//!   `POST /v1/cameras/{camera}/rollback` (`{"version": n}`, or no body for the version before the active
//!   one; 0 is the base enrolment) makes another version active and reloads. `?product=<recipe>` on
//!   either addresses that recipe's versions (each recipe learns on its own).
//! - `GET /v1/cameras/{camera}/recipes`: its recipes (name, enrolment, memory) and the one in use;
//!   `POST /v1/cameras/{camera}/recipe` (`{"product":"bracket-b"}`, token) switches it at once (docs/PLC.md).
//! - `GET /v1/dead-letters`: verdicts the broker would not take, with why and when (newest last).
//! - Bodies are limited to 64 KiB (413 beyond), part ids and questions to `types::command`'s bounds (400).
//! - `POST /v1/reload` (as SIGHUP) and `POST /v1/trigger` (`{"camera":"c","part_id":"P-1"}`, optionally
//!   with `"product"`, the recipe to judge the part with): these change
//!   state, so they need `Authorization: Bearer <http.token>` (401 without it, 403 when no token is
//!   configured). With `http.protect_reads` the read-only endpoints need it too; the probes never do.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::mpsc;

use crate::config::daemon::Secret;
use crate::describe::explainer::{ChatError, Explainer};
use crate::enrol::versions::{VersionError, Versions};
use crate::sink::outbox::DeadLetters;
use crate::sink::store::{Part, Store};
use crate::source::intake::CameraShared;
use crate::telemetry::Metrics;
use crate::types::command::{self, Command};
use crate::types::verdict::valid_frame_id;

/// Readiness: `Ok(())` or the reasons for not being ready.
pub type ReadyFn = Arc<dyn Fn() -> Result<(), Vec<String>> + Send + Sync>;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub store: Option<Arc<Store>>,
    pub ready: ReadyFn,
    /// Where reload and trigger requests go (the daemon's command channel).
    pub commands: mpsc::UnboundedSender<Command>,
    pub token: Option<Secret>,
    pub protect_reads: bool,
    /// Answers questions about frames.
    pub explainer: Arc<Explainer>,
    /// `daemon.enrolments`: the cameras' learned versions ("" keeps none).
    pub enrolments: std::path::PathBuf,
    /// The outbox's dead letters.
    pub dead_letters: DeadLetters,
    /// The running cameras, for their recipes.
    pub cameras: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Arc<CameraShared>>>>,
}

pub fn router(state: HttpState) -> Router {
    let reads = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/frames", get(frames))
        .route("/v1/frames/:id", get(|s, p| frame(s, p, Part::Verdict)))
        .route("/v1/frames/:id/image", get(|s, p| frame(s, p, Part::Image)))
        .route("/v1/frames/:id/overlay", get(|s, p| frame(s, p, Part::Overlay)))
        .route("/v1/frames/:id/chat", get(transcript))
        .route("/v1/cameras/:camera/enrolments", get(enrolments))
        .route("/v1/cameras/:camera/recipes", get(recipes))
        .route("/v1/dead-letters", get(dead_letters))
        .route_layer(middleware::from_fn_with_state(state.clone(), read_guard));
    let writes = Router::new()
        .route("/v1/frames/:id/chat", post(chat))
        .route("/v1/reload", post(reload))
        .route("/v1/trigger", post(trigger))
        .route("/v1/cameras/:camera/rollback", post(rollback))
        .route("/v1/cameras/:camera/recipe", post(select_recipe))
        .route_layer(middleware::from_fn_with_state(state.clone(), write_guard));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(reads)
        .merge(writes)
        .layer(axum::extract::DefaultBodyLimit::max(command::MAX_PAYLOAD))
        .with_state(state)
}

/// `None` when the request carries the configured token; otherwise the refusal to send.
fn refusal(s: &HttpState, req: &Request) -> Option<Response> {
    let Some(token) = &s.token else {
        return Some(
            (StatusCode::FORBIDDEN, "this endpoint needs http.token_file (or http.token) to be configured\n")
                .into_response(),
        );
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token.matches(given) {
        None
    } else {
        Some(
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "missing or wrong bearer token\n")
                .into_response(),
        )
    }
}

async fn write_guard(State(s): State<HttpState>, req: Request, next: Next) -> Response {
    match refusal(&s, &req) {
        None => next.run(req).await,
        Some(r) => r,
    }
}

async fn read_guard(State(s): State<HttpState>, req: Request, next: Next) -> Response {
    if !s.protect_reads {
        return next.run(req).await;
    }
    match refusal(&s, &req) {
        None => next.run(req).await,
        Some(r) => r,
    }
}

async fn reload(State(s): State<HttpState>) -> Response {
    match s.commands.send(Command::Reload) {
        Ok(()) => (StatusCode::ACCEPTED, "reload requested; the log says whether it applied\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping\n").into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerBody {
    camera: String,
    part_id: String,
    #[serde(default)]
    product: Option<String>,
}

/// Why a request body was refused: a shape the endpoint does not take, or a bound it breaks.
#[derive(Debug)]
pub enum BodyError {
    Shape(&'static str),
    Bound(command::Refusal),
}

/// `POST /v1/trigger`'s body, parsed and checked: `{"camera":"c","part_id":"P-1"}`, with an optional
/// `"product"` (the recipe to judge the part with).
pub fn trigger_body(body: &[u8]) -> Result<Command, BodyError> {
    let t = serde_json::from_slice::<TriggerBody>(body).map_err(|_| {
        BodyError::Shape("expected {\"camera\":\"...\",\"part_id\":\"...\"} (and optionally \"product\")\n")
    })?;
    let cmd = Command::Trigger { camera: t.camera, part_id: t.part_id, product: t.product };
    cmd.check().map_err(BodyError::Bound)?;
    Ok(cmd)
}

/// `POST /v1/frames/{id}/chat`'s body, parsed and checked: `{"question":"..."}`.
pub fn chat_body(body: &[u8]) -> Result<String, BodyError> {
    let q =
        serde_json::from_slice::<ChatBody>(body).map_err(|_| BodyError::Shape("expected {\"question\":\"...\"}\n"))?;
    command::check_question(&q.question).map_err(BodyError::Bound)?;
    Ok(q.question)
}

/// `POST /v1/cameras/{camera}/rollback`'s body: `{"version": n}`, or none (the version before the active one).
pub fn rollback_body(body: &[u8]) -> Result<Option<u32>, BodyError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(None);
    }
    serde_json::from_slice::<RollbackBody>(body)
        .map(|b| b.version)
        .map_err(|_| BodyError::Shape("expected {\"version\": n} or no body\n"))
}

/// 400 for a body that was refused (a bound counted as MQTT refusals are).
fn bad_body(s: &HttpState, e: BodyError) -> Response {
    match e {
        BodyError::Shape(why) => (StatusCode::BAD_REQUEST, why).into_response(),
        BodyError::Bound(r) => refused(s, &r),
    }
}

async fn trigger(State(s): State<HttpState>, body: axum::body::Bytes) -> Response {
    let cmd = match trigger_body(&body) {
        Ok(c) => c,
        Err(e) => return bad_body(&s, e),
    };
    match s.commands.send(cmd) {
        Ok(()) => (StatusCode::ACCEPTED, "trigger queued\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping\n").into_response(),
    }
}

/// `?product=` of the version endpoints: a recipe's versions instead of the camera's single enrolment.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionQuery {
    pub product: Option<String>,
}

/// The version folder of a camera (or of one of its recipes), or the response that says why there is
/// none. Recipes keep theirs under `<camera>.<recipe>`.
fn versions(s: &HttpState, camera: &str, product: Option<&str>) -> Result<Versions, Box<Response>> {
    let bad = |why: &'static str| Box::new((StatusCode::BAD_REQUEST, why).into_response());
    if !crate::config::daemon::valid_name(camera) {
        return Err(bad("not a camera name\n"));
    }
    if product.is_some_and(|p| !crate::config::daemon::valid_name(p)) {
        return Err(bad("not a recipe name\n"));
    }
    if s.enrolments.as_os_str().is_empty() {
        let why = "daemon.enrolments is \"\": learned versions are not kept\n";
        return Err(Box::new((StatusCode::NOT_FOUND, why).into_response()));
    }
    let key = product.map_or_else(|| camera.to_string(), |p| format!("{camera}.{p}"));
    Versions::existing(&s.enrolments, &key)
        .map_err(|e| Box::new((StatusCode::NOT_FOUND, format!("{e}\n")).into_response()))
}

async fn enrolments(
    State(s): State<HttpState>,
    Path(camera): Path<String>,
    query: Result<Query<VersionQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return (StatusCode::BAD_REQUEST, "the only query is ?product=<recipe>\n").into_response();
    };
    let v = match versions(&s, &camera, q.product.as_deref()) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let listed = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, VersionError> {
        Ok(serde_json::json!({
            "camera": camera,
            "product": q.product,
            "versions": v.list()?,
            "active": v.active()?,
            "history": v.history()?,
        }))
    })
    .await;
    match listed {
        Ok(Ok(body)) => json(StatusCode::OK, &body),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

fn camera(s: &HttpState, name: &str) -> Result<Arc<CameraShared>, Box<Response>> {
    crate::util::sync::lock(&s.cameras)
        .get(name)
        .cloned()
        .ok_or_else(|| Box::new((StatusCode::NOT_FOUND, format!("no camera {name:?} is running\n")).into_response()))
}

/// `GET /v1/cameras/{camera}/recipes`: each recipe's name, enrolment and memory, and the one in use.
async fn recipes(State(s): State<HttpState>, Path(name): Path<String>) -> Response {
    let cam = match camera(&s, &name) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let active = cam.model();
    let list: Vec<serde_json::Value> = cam
        .models()
        .iter()
        .filter_map(|m| {
            let name = m.recipe.as_ref()?;
            Some(serde_json::json!({
                "name": name,
                "product": m.words,
                "enrolment": m.enrolment_ref,
                "bytes": m.enrolment.bytes(),
                "active": Arc::ptr_eq(m, &active),
            }))
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({"camera": name, "active": active.recipe, "recipes": list}))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeBody {
    product: String,
}

/// `POST /v1/cameras/{camera}/recipe`'s body, parsed and checked: `{"product":"bracket-b"}`.
pub fn recipe_body(body: &[u8]) -> Result<String, BodyError> {
    let r =
        serde_json::from_slice::<RecipeBody>(body).map_err(|_| BodyError::Shape("expected {\"product\":\"...\"}\n"))?;
    command::check_product(&r.product).map_err(BodyError::Bound)?;
    Ok(r.product)
}

/// `POST /v1/cameras/{camera}/recipe`: switches the recipe in use at once (docs/PLC.md); 404 names the
/// camera's recipes when the product is not one of them.
async fn select_recipe(State(s): State<HttpState>, Path(name): Path<String>, body: axum::body::Bytes) -> Response {
    let product = match recipe_body(&body) {
        Ok(p) => p,
        Err(e) => return bad_body(&s, e),
    };
    let cam = match camera(&s, &name) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    match cam.switch_recipe(&product) {
        Ok(before) => json(StatusCode::OK, &serde_json::json!({"camera": name, "before": before, "active": product})),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: Option<u32>,
}

async fn rollback(
    State(s): State<HttpState>,
    Path(camera): Path<String>,
    query: Result<Query<VersionQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(Query(q)) = query else {
        return (StatusCode::BAD_REQUEST, "the only query is ?product=<recipe>\n").into_response();
    };
    let version = match rollback_body(&body) {
        Ok(v) => v,
        Err(e) => return bad_body(&s, e),
    };
    let v = match versions(&s, &camera, q.product.as_deref()) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match tokio::task::spawn_blocking(move || v.rollback(version)).await {
        Ok(Ok(active)) => {
            let product = q.product.as_deref().unwrap_or("");
            tracing::warn!(camera, product, "enrolment rolled back over HTTP: version {active} is active; reloading");
            if s.commands.send(Command::Reload).is_err() {
                return (StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping\n").into_response();
            }
            let body =
                serde_json::json!({"camera": camera, "product": q.product, "active": active, "reload": "requested"});
            json(StatusCode::OK, &body)
        }
        Ok(Err(e @ (VersionError::NoSuchVersion { .. } | VersionError::AtBase { .. }))) => {
            (StatusCode::CONFLICT, format!("{e}\n")).into_response()
        }
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatBody {
    question: String,
}

fn not_a_frame_id() -> Response {
    (StatusCode::BAD_REQUEST, "not a frame id: letters, digits, '-', '_' and '.' only\n").into_response()
}

/// 400 for a request over a bound, counted as MQTT refusals are.
fn refused(s: &HttpState, e: &command::Refusal) -> Response {
    s.metrics.command(e.kind());
    (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
}

async fn dead_letters(State(s): State<HttpState>) -> Response {
    json(StatusCode::OK, &s.dead_letters.list())
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], serde_json::to_vec(v).unwrap_or_default()).into_response()
}

async fn chat(State(s): State<HttpState>, Path(id): Path<String>, body: axum::body::Bytes) -> Response {
    if !valid_frame_id(&id) {
        return not_a_frame_id();
    }
    let question = match chat_body(&body) {
        Ok(q) => q,
        Err(e) => return bad_body(&s, e),
    };
    let ex = s.explainer.clone();
    match tokio::task::spawn_blocking(move || ex.chat(&id, &question)).await {
        Ok(Ok(answer)) => json(StatusCode::OK, &answer),
        Ok(Err(e @ ChatError::UnknownFrame(_))) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
        Ok(Err(e @ ChatError::Stopping)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        Ok(Err(e)) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}\n")).into_response(),
    }
}

async fn transcript(State(s): State<HttpState>, Path(id): Path<String>) -> Response {
    if !valid_frame_id(&id) {
        return not_a_frame_id();
    }
    let ex = s.explainer.clone();
    match tokio::task::spawn_blocking(move || ex.transcript(&id)).await.ok().flatten() {
        Some(t) => json(StatusCode::OK, &t),
        None => (StatusCode::NOT_FOUND, "no conversation about this frame (only NG frames have one)\n").into_response(),
    }
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

/// `GET /v1/frames`'s filters.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameQuery {
    pub camera: Option<String>,
    pub product: Option<String>,
    pub verdict: Option<String>,
    pub limit: Option<usize>,
}

/// Most stored frames `GET /v1/frames` reads through, newest first.
pub const MAX_FRAMES_SCANNED: usize = 2000;

impl FrameQuery {
    /// The filters checked: names as names, a verdict as one of the four, a limit of 1 to 500.
    pub fn checked(self) -> Result<Self, String> {
        if let Some(c) = &self.camera
            && !crate::config::daemon::valid_name(c)
        {
            return Err("camera: not a camera name".into());
        }
        if let Some(p) = &self.product {
            command::check_product(p).map_err(|e| e.to_string())?;
        }
        if let Some(v) = &self.verdict
            && !["OK", "NG", "SKIPPED", "ERROR"].contains(&v.as_str())
        {
            return Err("verdict: use OK, NG, SKIPPED or ERROR".into());
        }
        if self.limit.is_some_and(|l| !(1..=500).contains(&l)) {
            return Err("limit: use 1 to 500".into());
        }
        Ok(self)
    }

    fn matches(&self, m: &crate::types::verdict::VerdictMessage) -> bool {
        self.camera.as_ref().is_none_or(|c| &m.camera == c)
            && self.product.as_ref().is_none_or(|p| m.product.as_ref() == Some(p))
            && self.verdict.as_ref().is_none_or(|v| m.verdict.as_str() == v)
    }
}

async fn frames(
    State(s): State<HttpState>,
    query: Result<Query<FrameQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query.map_err(|e| e.body_text()).and_then(|Query(q)| q.checked()) {
        Ok(q) => q,
        Err(why) => return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
    };
    let Some(store) = s.store.clone() else {
        return (StatusCode::NOT_FOUND, "the flagged-frame store is off (store.dir = \"\")\n").into_response();
    };
    let listed = tokio::task::spawn_blocking(move || {
        let limit = q.limit.unwrap_or(50);
        let mut out = Vec::new();
        for m in store.newest_verdicts(MAX_FRAMES_SCANNED) {
            if q.matches(&m) {
                out.push(serde_json::json!({
                    "frame_id": m.frame_id, "camera": m.camera, "product": m.product, "part_id": m.part_id,
                    "verdict": m.verdict, "score": m.score, "threshold": m.threshold, "regions": m.regions.len(),
                    "captured_at": m.captured_at, "frame_url": format!("/v1/frames/{}", m.frame_id),
                }));
                if out.len() == limit {
                    break;
                }
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    json(StatusCode::OK, &serde_json::json!({"frames": listed}))
}

async fn frame(State(s): State<HttpState>, Path(id): Path<String>, part: Part) -> Response {
    if !valid_frame_id(&id) {
        return not_a_frame_id();
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
/// The HTTP address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on http.listen = {addr:?}: {cause}")]
pub struct BindError {
    pub addr: String,
    pub cause: std::io::Error,
}

pub async fn bind(addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr), BindError> {
    let err = |cause| BindError { addr: addr.into(), cause };
    let l = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let a = l.local_addr().map_err(err)?;
    Ok((l, a))
}
