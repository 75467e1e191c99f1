//! The operator station: web pages under `/ui` on the HTTP server, rendered on the server from templates
//! embedded in the binary (minijinja), with one small embedded script. Nothing is fetched from outside.
//! - `/ui/` (line): a tile per camera, updated live over server-sent events (`/ui/events`, [`board`]);
//! - `/ui/review`: the stored NG frames, newest first, filtered by camera, product and time;
//! - `/ui/frames/{id}`: a frame with its heat map and region boxes, the answer, score against threshold,
//!   the conversation, and a box to ask about it;
//! - teaching ([`teach`]): a false reject previewed, applied as a new enrolment version, rolled back;
//! - `/ui/cameras/{camera}`: a camera's versions and history; `/ui/audit`: every operator action.
//!
//! Reading follows `http.protect_reads` (then every page needs a login). Every action needs a login
//! ([`auth`]: argon2 hashes, HttpOnly SameSite=Strict session cookie) and the session's CSRF token.

pub mod auth;
pub mod board;
pub mod products;
pub mod teach;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Form, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::Environment;
use tokio::sync::{mpsc, watch};

use crate::config::ui::UiConfig;
use crate::describe::explainer::Explainer;
use crate::sink::audit::{AuditEntry, AuditLog};
use crate::sink::store::{Part, Store};
use crate::source::intake::CameraShared;
use crate::telemetry::Metrics;
use crate::types::command::{self, Command};
use crate::types::verdict::{VerdictMessage, valid_frame_id};

use auth::{Login, Sessions};

/// Everything the pages need: what the daemon gives, and the station's own state.
pub struct Ui {
    pub given: UiParts,
    pub sessions: Sessions,
    pub board: Arc<board::Board>,
    /// New products being enrolled.
    jobs: products::Jobs,
    env: Environment<'static>,
}

pub type UiState = Arc<Ui>;

/// The channel of notes the MQTT link publishes once, and the audit topic. Weak: the link finishes when
/// the daemon's own senders are gone, and the station must not keep it waiting (a stopping daemon then
/// keeps its audit entries on disk only).
pub type AuditNotes = (mpsc::WeakUnboundedSender<(String, Vec<u8>)>, String);

/// What the daemon gives the station.
pub struct UiParts {
    pub node: String,
    pub metrics: Arc<Metrics>,
    pub protect_reads: bool,
    pub cameras: Arc<Mutex<BTreeMap<String, Arc<CameraShared>>>>,
    pub store: Option<Arc<Store>>,
    pub explainer: Arc<Explainer>,
    pub audit: AuditLog,
    /// Where each audit entry is also published (the MQTT link's notes, the audit topic).
    pub notes: Option<AuditNotes>,
    /// The daemon's command channel (a reload after a rollback).
    pub commands: mpsc::UnboundedSender<Command>,
    pub teacher: teach::Teacher,
    /// `daemon.enrolments`: where products enrolled from the station are kept ("" keeps none).
    pub enrolments: std::path::PathBuf,
    /// Turns true when the server stops: live streams end so that shutdown does not wait for them.
    pub stop: watch::Receiver<bool>,
}

/// The embedded templates, by name.
const TEMPLATES: [(&str, &str); 12] = [
    ("base.html", include_str!("assets/base.html")),
    ("login.html", include_str!("assets/login.html")),
    ("line.html", include_str!("assets/line.html")),
    ("review.html", include_str!("assets/review.html")),
    ("frame.html", include_str!("assets/frame.html")),
    ("preview.html", include_str!("assets/preview.html")),
    ("zones.html", include_str!("assets/zones.html")),
    ("product.html", include_str!("assets/product.html")),
    ("product_job.html", include_str!("assets/product_job.html")),
    ("camera.html", include_str!("assets/camera.html")),
    ("audit.html", include_str!("assets/audit.html")),
    ("message.html", include_str!("assets/message.html")),
];

/// The embedded templates, parsed (a unit test renders each one).
fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    for (name, text) in TEMPLATES {
        env.add_template(name, text).expect("the embedded templates parse");
    }
    env
}

impl Ui {
    pub fn new(cfg: &UiConfig, parts: UiParts) -> Arc<Self> {
        let env = templates();
        let ttl = std::time::Duration::from_secs(60 * cfg.session_minutes);
        Arc::new(Self {
            sessions: Sessions::new(&cfg.operator, ttl),
            board: Arc::new(board::Board::new(parts.metrics.clone())),
            jobs: products::Jobs::default(),
            given: parts,
            env,
        })
    }

    /// Renders a page; `ctx` is merged over the fields every page has (node, user, CSRF token).
    fn page(&self, status: StatusCode, name: &str, login: Option<&Login>, ctx: serde_json::Value) -> Response {
        let mut all = serde_json::json!({
            "node": self.given.node,
            "user": login.map(|l| l.user.clone()),
            "csrf": login.map(|l| l.csrf.clone()).unwrap_or_default(),
        });
        if let (Some(a), serde_json::Value::Object(b)) = (all.as_object_mut(), ctx) {
            a.extend(b);
        }
        let rendered = self.env.get_template(name).and_then(|t| t.render(minijinja::Value::from_serialize(&all)));
        match rendered {
            Ok(html) => (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
            Err(e) => {
                tracing::error!("ui: cannot render {name}: {e:#}");
                (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered; the log says why\n")
                    .into_response()
            }
        }
    }

    /// A page that only says something (a refusal, a result).
    fn message(&self, status: StatusCode, login: Option<&Login>, title: &str, message: &str, back: &str) -> Response {
        let kind = if status.is_success() { "" } else { "error" };
        let ctx = serde_json::json!({"title": title, "message": message, "back": back, "kind": kind});
        self.page(status, "message.html", login, ctx)
    }

    /// Keeps an operator action: on disk first (fsync), then on MQTT. An action whose record cannot be
    /// written is reported as an error to the operator, and logged.
    fn record(&self, entry: &AuditEntry) -> Result<(), String> {
        self.given.audit.record(entry).map_err(|e| {
            tracing::error!("{e}: an operator action is not recorded");
            e.to_string()
        })?;
        if let Some((tx, topic)) = &self.given.notes
            && let Some(tx) = tx.upgrade()
        {
            let _ = tx.send((topic.clone(), serde_json::to_vec(entry).unwrap_or_default()));
        }
        Ok(())
    }

    fn camera(&self, name: &str) -> Option<Arc<CameraShared>> {
        crate::util::sync::lock(&self.given.cameras).get(name).cloned()
    }
}

pub fn router(ui: UiState) -> Router {
    let reads = Router::new()
        .route("/ui/", get(line))
        .route("/ui/events", get(events))
        .route("/ui/review", get(review))
        .route("/ui/frames/:id", get(frame))
        .route("/ui/frames/:id/image", get(|s, p| frame_file(s, p, Part::Image)))
        .route("/ui/frames/:id/overlay", get(|s, p| frame_file(s, p, Part::Overlay)))
        .route("/ui/frames/:id/zones", get(teach::zones_page))
        .route("/ui/products/new", get(products::new_page))
        .route("/ui/products/jobs/:id", get(products::job_page))
        .route("/ui/cameras/:camera", get(teach::camera_page))
        .route("/ui/audit", get(audit))
        .route_layer(middleware::from_fn_with_state(ui.clone(), read_guard));
    let actions = Router::new()
        .route("/ui/logout", post(logout))
        .route("/ui/frames/:id/chat", post(chat))
        .route("/ui/frames/:id/false-reject", post(teach::preview))
        .route("/ui/frames/:id/zones", post(teach::zones_preview))
        .route("/ui/frames/:id/label", post(teach::label))
        .route("/ui/products", post(products::create).layer(DefaultBodyLimit::max(products::MAX_UPLOAD)))
        .route("/ui/lessons/:lesson/apply", post(teach::apply))
        .route("/ui/cameras/:camera/rollback", post(teach::rollback))
        .route_layer(middleware::from_fn_with_state(ui.clone(), action_guard));
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/assets/:name", get(asset))
        .merge(reads)
        .merge(actions)
        .layer(axum::extract::DefaultBodyLimit::max(command::MAX_PAYLOAD))
        .with_state(ui)
}

/// With `http.protect_reads`, a page needs a login: the browser is sent to the login page.
async fn read_guard(State(ui): State<UiState>, req: Request, next: Next) -> Response {
    if ui.given.protect_reads && ui.sessions.get(req.headers()).is_none() {
        let next_page = req.uri().path().to_string();
        return Redirect::to(&format!("/ui/login?next={}", urlencode(&next_page))).into_response();
    }
    next.run(req).await
}

/// Every action needs a login and its CSRF token (form field `csrf` or header `X-CSRF-Token`); the
/// login is handed to the handler as an extension.
async fn action_guard(State(ui): State<UiState>, req: Request, next: Next) -> Response {
    let Some(login) = ui.sessions.get(req.headers()) else {
        return ui.message(
            StatusCode::UNAUTHORIZED,
            None,
            "Log in first",
            "This action needs an operator's login (it may have expired).",
            "/ui/login",
        );
    };
    let (parts, body) = req.into_parts();
    // An upload of images may be large; every other action is a small form.
    let limit = if parts.uri.path() == "/ui/products" { products::MAX_UPLOAD } else { command::MAX_PAYLOAD };
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        let why = format!("The request is larger than {} KiB: nothing was changed.", limit >> 10);
        return ui.message(StatusCode::PAYLOAD_TOO_LARGE, Some(&login), "Too large", &why, "/ui/");
    };
    let header_token = parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::to_string);
    // A form's token is its `csrf` field; an upload's (multipart, read by its handler) is in the query.
    let form_token =
        form_field(&bytes, "csrf").or_else(|| form_field(parts.uri.query().unwrap_or("").as_bytes(), "csrf"));
    if !auth::csrf_ok(&login, header_token.as_deref().or(form_token.as_deref())) {
        tracing::warn!(user = %login.user, path = %parts.uri.path(), "ui: an action without its CSRF token was refused");
        ui.given.metrics.ui_action("csrf", "refused");
        return ui.message(
            StatusCode::FORBIDDEN,
            Some(&login),
            "Refused",
            "The form's CSRF token is missing or wrong: reload the page and try again. Nothing was changed.",
            "/ui/",
        );
    }
    let mut req = Request::from_parts(parts, axum::body::Body::from(bytes));
    req.extensions_mut().insert(login);
    next.run(req).await
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("", s)]).map(|x| x.trim_start_matches('=').to_string()).unwrap_or_default()
}

/// Embedded static files.
async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind): (&'static str, &str) = match name.as_str() {
        "ui.css" => (include_str!("assets/ui.css"), "text/css; charset=utf-8"),
        "ui.js" => (include_str!("assets/ui.js"), "text/javascript; charset=utf-8"),
        "empty.svg" => (include_str!("assets/empty.svg"), "image/svg+xml"),
        _ => return (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    };
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "max-age=3600")], body).into_response()
}

#[derive(serde::Deserialize, Default)]
struct NextQuery {
    next: Option<String>,
}

/// Only a page of this station may be where a login returns to.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.contains("//") && !n.contains('\\') => n.to_string(),
        _ => "/ui/".into(),
    }
}

async fn login_page(State(ui): State<UiState>, Query(q): Query<NextQuery>) -> Response {
    let ctx = serde_json::json!({"next": safe_next(q.next.as_deref()), "has_operators": ui.sessions.has_operators()});
    ui.page(StatusCode::OK, "login.html", None, ctx)
}

#[derive(serde::Deserialize)]
struct LoginForm {
    name: String,
    password: String,
    #[serde(default)]
    next: Option<String>,
}

async fn login(
    State(ui): State<UiState>,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return ui.message(
            StatusCode::BAD_REQUEST,
            None,
            "Log in",
            "The form needs a name and a password.",
            "/ui/login",
        );
    };
    let (name, password) = (f.name.trim().to_string(), f.password);
    let checker = ui.clone();
    let who = name.clone();
    let ok = tokio::task::spawn_blocking(move || checker.sessions.verify(&who, &password)).await.unwrap_or(false);
    if !ok {
        tracing::warn!(name = %name.escape_debug(), "ui: a login was refused (wrong name or password)");
        ui.given.metrics.ui_action("login", "refused");
        let shown: String = name.chars().take(64).collect();
        let _ = ui.record(&AuditEntry::now(&shown, "login_refused", "", "wrong name or password".into()));
        let ctx = serde_json::json!({
            "error": "Wrong name or password.", "name": shown, "next": safe_next(f.next.as_deref()),
            "has_operators": ui.sessions.has_operators(),
        });
        return ui.page(StatusCode::UNAUTHORIZED, "login.html", None, ctx);
    }
    let (token, _) = ui.sessions.open(&name);
    let _ = ui.record(&AuditEntry::now(&name, "login", "", String::new()));
    tracing::info!(user = %name, "ui: operator logged in");
    ui.given.metrics.ui_action("login", "ok");
    let mut r = Redirect::to(&safe_next(f.next.as_deref())).into_response();
    if let Ok(v) = ui.sessions.set_cookie(&token).parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(
    State(ui): State<UiState>,
    axum::Extension(login): axum::Extension<Login>,
    headers: HeaderMap,
) -> Response {
    ui.sessions.close(&headers);
    let _ = ui.record(&AuditEntry::now(&login.user, "logout", "", String::new()));
    let mut r = Redirect::to("/ui/login").into_response();
    if let Ok(v) = auth::clear_cookie().parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn line(State(ui): State<UiState>, headers: HeaderMap) -> Response {
    let login = ui.sessions.get(&headers);
    let ctx = serde_json::json!({"page": "line", "tiles": ui.board.tiles()});
    ui.page(StatusCode::OK, "line.html", login.as_ref(), ctx)
}

/// The line page's live stream: one `tile` event per verdict. A page that falls behind skips ahead; the
/// stream ends when the server stops.
async fn events(State(ui): State<UiState>) -> Response {
    let rx = ui.board.subscribe();
    let stop = ui.given.stop.clone();
    let board = Following::new(ui.given.metrics.clone());
    let stream = futures_util::stream::unfold((rx, stop, board), |(mut rx, mut stop, board)| async move {
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(json) => {
                        let ev = Event::default().event("tile").data(&*json);
                        return Some((Ok::<_, std::convert::Infallible>(ev), (rx, stop, board)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => board.0.ui_events_skipped(n),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                },
                _ = stop.changed() => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// Counts an open live stream while it lives.
struct Following(Arc<Metrics>);

impl Following {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.ui_stream(true);
        Self(metrics)
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.0.ui_stream(false);
    }
}

/// The review page's filters (all optional).
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewQuery {
    pub camera: Option<String>,
    pub product: Option<String>,
    /// `YYYY-MM-DDTHH:MM` (a browser's datetime-local, taken as UTC): frames captured at or after it.
    pub since: Option<String>,
    /// A defect class: frames with a region of that label.
    pub label: Option<String>,
}

/// Most frames the review page shows.
const REVIEW_LIMIT: usize = 120;

impl ReviewQuery {
    fn checked(mut self) -> Result<(Self, Option<String>), String> {
        for f in [&mut self.camera, &mut self.product, &mut self.since, &mut self.label] {
            if f.as_ref().is_some_and(|s| s.trim().is_empty()) {
                *f = None;
            }
        }
        if self.camera.as_ref().is_some_and(|c| !crate::config::daemon::valid_name(c)) {
            return Err("camera: not a camera name".into());
        }
        if let Some(p) = &self.product {
            command::check_product(p).map_err(|e| e.to_string())?;
        }
        if let Some(l) = &self.label {
            self.label = Some(crate::detect::classes::clean_label(l).map_err(|e| format!("label: {e}"))?);
        }
        let since = match &self.since {
            None => None,
            Some(s) => {
                let ok = s.len() >= 16
                    && s.is_char_boundary(16)
                    && humantime::parse_rfc3339_weak(&format!("{}:00", &s[..16].replace('T', " "))).is_ok();
                if !ok {
                    return Err("since: use YYYY-MM-DDTHH:MM".into());
                }
                Some(s[..16].to_string())
            }
        };
        Ok((self, since))
    }

    fn matches(&self, m: &VerdictMessage, since: Option<&str>) -> bool {
        self.camera.as_ref().is_none_or(|c| &m.camera == c)
            && self.product.as_ref().is_none_or(|p| m.product.as_ref() == Some(p))
            && since.is_none_or(|s| m.captured_at.get(..16).is_some_and(|t| t >= s))
            && self.label.as_ref().is_none_or(|l| m.regions.iter().any(|r| r.label.as_ref() == Some(l)))
    }
}

async fn review(
    State(ui): State<UiState>,
    headers: HeaderMap,
    query: Result<Query<ReviewQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let login = ui.sessions.get(&headers);
    let checked = query.map_err(|e| e.body_text()).and_then(|Query(q)| q.checked());
    let (q, since) = match checked {
        Ok(x) => x,
        Err(why) => {
            let ctx = serde_json::json!({"page": "review", "error": why, "q": {}, "frames": []});
            return ui.page(StatusCode::BAD_REQUEST, "review.html", login.as_ref(), ctx);
        }
    };
    let Some(store) = ui.given.store.clone() else {
        return ui.message(
            StatusCode::NOT_FOUND,
            login.as_ref(),
            "Review",
            "The flagged-frame store is off (store.dir = \"\"): no NG frame is kept.",
            "/ui/",
        );
    };
    let frames = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for m in store.newest_verdicts(crate::control::http::MAX_FRAMES_SCANNED) {
            if q.matches(&m, since.as_deref()) {
                out.push(m);
                if out.len() == REVIEW_LIMIT {
                    break;
                }
            }
        }
        (q, out)
    })
    .await;
    let Ok((q, frames)) = frames else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "the store could not be read\n").into_response();
    };
    let ctx = serde_json::json!({"page": "review", "q": q, "frames": frames});
    ui.page(StatusCode::OK, "review.html", login.as_ref(), ctx)
}

/// A stored frame's verdict, or the page that says why there is none.
async fn stored_verdict(ui: &UiState, login: Option<&Login>, id: &str) -> Result<VerdictMessage, Box<Response>> {
    if !valid_frame_id(id) {
        return Err(Box::new(ui.message(
            StatusCode::BAD_REQUEST,
            login,
            "No such frame",
            "That is not a frame id.",
            "/ui/review",
        )));
    }
    let Some(store) = ui.given.store.clone() else {
        return Err(Box::new(ui.message(
            StatusCode::NOT_FOUND,
            login,
            "No such frame",
            "The flagged-frame store is off.",
            "/ui/",
        )));
    };
    let id2 = id.to_string();
    let bytes = tokio::task::spawn_blocking(move || store.get(&id2, Part::Verdict)).await.ok().flatten();
    match bytes.and_then(|b| serde_json::from_slice::<VerdictMessage>(&b).ok()) {
        Some(m) => Ok(m),
        None => Err(Box::new(ui.message(
            StatusCode::NOT_FOUND,
            login,
            "No such frame",
            &format!("Frame {id} is not stored (any more): only NG frames are kept, the oldest deleted first."),
            "/ui/review",
        ))),
    }
}

async fn frame(State(ui): State<UiState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let login = ui.sessions.get(&headers);
    let m = match stored_verdict(&ui, login.as_ref(), &id).await {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let ex = ui.given.explainer.clone();
    let fid = id.clone();
    let transcript = tokio::task::spawn_blocking(move || ex.transcript(&fid)).await.ok().flatten();
    let (description, turns) = match transcript {
        Some(t) => {
            let mut turns = t.turns;
            // The first turn is the description the model gave unasked.
            let first =
                if turns.first().is_some_and(|t| t.question.is_empty()) { Some(turns.remove(0).answer) } else { None };
            (first, turns)
        }
        None => (None, Vec::new()),
    };
    // The product's defect classes, offered when labelling a region.
    let classes = ui
        .camera(&m.camera)
        .and_then(|c| c.recipe_model(m.product.as_deref()).ok())
        .map(|model| crate::detect::classes::known_labels(&model.enrolment.meta.classes))
        .unwrap_or_default();
    let ctx = serde_json::json!({"page": "review", "m": m, "description": description, "turns": turns,
        "classes": classes});
    ui.page(StatusCode::OK, "frame.html", login.as_ref(), ctx)
}

async fn frame_file(State(ui): State<UiState>, Path(id): Path<String>, part: Part) -> Response {
    if !valid_frame_id(&id) {
        return (StatusCode::BAD_REQUEST, "not a frame id\n").into_response();
    }
    let Some(store) = ui.given.store.clone() else {
        return (StatusCode::NOT_FOUND, "the flagged-frame store is off\n").into_response();
    };
    match tokio::task::spawn_blocking(move || store.get(&id, part)).await.ok().flatten() {
        Some(bytes) => ([(header::CONTENT_TYPE, part.content_type())], bytes).into_response(),
        None => (StatusCode::NOT_FOUND, "no such stored frame\n").into_response(),
    }
}

/// Asks about a frame: the answer comes back as server-sent events, `piece` by `piece` as a local model
/// writes it, then `done` with the checked answer (which replaces the pieces if the check refused
/// them), or `error`.
async fn chat(
    State(ui): State<UiState>,
    axum::Extension(login): axum::Extension<Login>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if !valid_frame_id(&id) {
        return (StatusCode::BAD_REQUEST, "not a frame id\n").into_response();
    }
    let Some(question) = form_field(&body, "question") else {
        return (StatusCode::BAD_REQUEST, "the form needs a question\n").into_response();
    };
    if let Err(e) = command::check_question(&question) {
        return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
    }
    tracing::info!(user = %login.user, frame = %id, "ui: a question about a frame");
    let (tx, rx) = mpsc::channel::<String>(CHAT_PIECES);
    let ex = ui.given.explainer.clone();
    let answer = tokio::task::spawn_blocking(move || ex.chat_streaming(&id, &question, Some(tx)));
    let state = (rx, Some(answer), ui.clone());
    let stream = futures_util::stream::unfold(state, |(mut rx, answer, ui)| async move {
        let answer = answer?;
        // Pieces until the model is done (the sender goes with the finished job), then the answer.
        if let Some(piece) = rx.recv().await {
            let ev = Event::default().event("piece").data(serde_json::to_string(&piece).unwrap_or_default());
            return Some((Ok::<_, std::convert::Infallible>(ev), (rx, Some(answer), ui)));
        }
        let done = answer.await;
        ui.given.metrics.ui_action("chat", if matches!(done, Ok(Ok(_))) { "ok" } else { "failed" });
        let ev = match done {
            Ok(Ok(a)) => Event::default().event("done").data(serde_json::to_string(&a).unwrap_or_default()),
            Ok(Err(e)) => {
                Event::default().event("error").data(serde_json::to_string(&e.to_string()).unwrap_or_default())
            }
            Err(e) => Event::default().event("error").data(serde_json::to_string(&e.to_string()).unwrap_or_default()),
        };
        Some((Ok(ev), (rx, None, ui)))
    });
    Sse::new(stream).into_response()
}

/// Pieces of an answer that may wait for the page; more are dropped (the answer at the end is whole).
const CHAT_PIECES: usize = 1024;

async fn audit(State(ui): State<UiState>, headers: HeaderMap) -> Response {
    let login = ui.sessions.get(&headers);
    let entries = ui.given.audit.recent(500);
    match entries {
        Ok(entries) => ui.page(
            StatusCode::OK,
            "audit.html",
            login.as_ref(),
            serde_json::json!({"page": "audit", "entries": entries}),
        ),
        Err(e) => ui.message(StatusCode::INTERNAL_SERVER_ERROR, login.as_ref(), "Audit log", &e.to_string(), "/ui/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VerdictMessage {
        let t = crate::source::intake::Intake::new_test("cam", 1, true, crate::config::daemon::Trigger::EveryFrame);
        let mut m =
            t.intake.camera.skeleton(7, "cam-1-7".into(), Some("P-1".into()), std::time::SystemTime::now(), None);
        let region = r#"{"bbox":[10,20,30,40],"area_pct":1.0,"cell":"top_left","peak":2.0}"#;
        m.verdict = crate::types::verdict::Outcome::Ng;
        m.score = Some(1.5);
        m.threshold = Some(1.0);
        m.regions = vec![serde_json::from_str(region).unwrap()];
        m.answer = Some("Yes <script>".into());
        m.width = Some(320);
        m.height = Some(240);
        m.captured_at = "2026-12-07T10:00:00.000Z".into();
        m
    }

    fn render(name: &str, ctx: serde_json::Value) -> String {
        let mut all = serde_json::json!({"node": "n", "user": "anna", "csrf": "t0k"});
        all.as_object_mut().unwrap().extend(ctx.as_object().unwrap().clone());
        templates().get_template(name).unwrap().render(minijinja::Value::from_serialize(&all)).unwrap()
    }

    #[test]
    fn every_page_renders_and_escapes_what_it_shows() {
        let m = sample();
        let frame = render("frame.html", serde_json::json!({"m": m, "description": "d", "turns": []}));
        assert!(frame.contains("Yes &lt;script&gt;") && !frame.contains("Yes <script>"), "{frame}");
        assert!(frame.contains(r#"<rect class="region" x="10" y="20" width="30" height="40">"#), "{frame}");
        assert!(frame.contains(r#"name="csrf" value="t0k""#));
        assert!(frame.contains(r#"id="label-0""#) && frame.contains("no class"), "{frame}");
        let mut labelled = m.clone();
        labelled.regions[0].label = Some("stain".into());
        labelled.regions[0].label_confidence = Some(0.87);
        let frame = render("frame.html", serde_json::json!({"m": labelled, "classes": ["stain"], "turns": []}));
        assert!(frame.contains(r#"<b class="label">stain</b> (87% sure)"#), "{frame}");
        assert!(frame.contains(r#"<option value="stain">"#), "{frame}");
        let tile = serde_json::json!({"camera": "cam", "ok": 1, "ng": 1, "skipped": 0, "error": 0, "ng_rate": 0.5,
            "fps": 2.0, "recipe": null, "trigger": "every frame", "last": m, "last_ng": "cam-1-7"});
        let line = render("line.html", serde_json::json!({"tiles": [tile]}));
        assert!(line.contains("/ui/frames/cam-1-7/overlay"), "{line}");
        assert!(render("review.html", serde_json::json!({"q": {}, "frames": [m]})).contains("data-frame=\"cam-1-7\""));
        let l = serde_json::json!({"threshold_before": 1.0, "threshold_after": 1.1, "score_before": 1.5,
            "score_after": 0.5, "bank_before": 10, "bank_after": 20, "evidence": "e", "part_passes": true});
        let p = render(
            "preview.html",
            serde_json::json!({"frame_id": "cam-1-7", "camera": "cam", "product": null,
            "l": l, "flips": [{"frame_id": "cam-1-8", "before": 1.2, "after": 0.9}], "checked": 1, "lesson": "k"}),
        );
        assert!(p.contains("/ui/lessons/k/apply") && p.contains("cam-1-8"), "{p}");
        let p = render(
            "preview.html",
            serde_json::json!({"kind": "zones", "frame_id": "cam-1-7", "camera": "cam", "product": null,
            "l": l, "flips": [], "checked": 0, "lesson": "k"}),
        );
        assert!(p.contains("Regions: what would change") && !p.contains("bank patches"), "{p}");
        let zones = r#"[{"kind":"ignore","points":[[0.1,0.1],[0.2,0.1],[0.2,0.2]]}]"#;
        let z = render(
            "zones.html",
            serde_json::json!({"m": m, "zones": serde_json::from_str::<serde_json::Value>(zones).unwrap(),
            "zones_json": zones, "max_zones": 32, "max_points": 64}),
        );
        assert!(z.contains("/ui/frames/cam-1-7/zones") && z.contains("&quot;ignore&quot;"), "{z}");
        let p = render("product.html", serde_json::json!({"cameras": ["cam"], "max_images": 32, "max_mib": 16}));
        assert!(p.contains(r#"action="/ui/products?csrf=t0k""#) && p.contains("multipart/form-data"), "{p}");
        let job = serde_json::json!({"camera": "cam", "name": "b", "lines": ["encoding <1>"],
            "state": {"state": "running"}});
        let j = render("product_job.html", serde_json::json!({"job": job}));
        assert!(j.contains(r#"http-equiv="refresh""#) && j.contains("encoding &lt;1&gt;"), "{j}");
        let job = serde_json::json!({"camera": "cam", "name": "b", "lines": [],
            "state": {"state": "failed", "message": "no"}});
        let j = render("product_job.html", serde_json::json!({"job": job}));
        assert!(!j.contains("refresh") && j.contains(r#"data-state="failed""#), "{j}");
        let r = serde_json::json!({"key": "camera", "product": null, "in_use": true, "active": 1, "versions": [1],
            "history": [{"when": "w", "action": "taught", "version": 1, "image_threshold": 1.1, "note": "n"}]});
        assert!(render("camera.html", serde_json::json!({"camera": "cam", "recipes": [r]})).contains("rollback"));
        let e = crate::sink::audit::AuditEntry::now("anna", "rollback", "cam", "d".into());
        assert!(render("audit.html", serde_json::json!({"entries": [e]})).contains("rollback"));
        assert!(render("login.html", serde_json::json!({"next": "/ui/", "has_operators": true})).contains("password"));
        assert!(
            render("message.html", serde_json::json!({"title": "t", "message": "m", "back": "/ui/"})).contains("m")
        );
    }

    #[test]
    fn a_login_only_returns_to_a_page_of_the_station() {
        assert_eq!(safe_next(Some("/ui/frames/x")), "/ui/frames/x");
        for bad in ["https://evil.example/", "//evil.example/ui/", "/ui//evil", "/v1/reload", "/ui/\\evil"] {
            assert_eq!(safe_next(Some(bad)), "/ui/", "{bad}");
        }
        assert_eq!(safe_next(None), "/ui/");
    }

    #[test]
    fn review_filters_are_checked() {
        let q = |c: Option<&str>, s: Option<&str>| {
            ReviewQuery { camera: c.map(Into::into), product: None, since: s.map(Into::into), label: None }.checked()
        };
        assert!(q(Some("../x"), None).is_err());
        assert!(q(None, Some("yesterday")).is_err());
        let (_, since) = q(Some(""), Some("2026-12-07T10:00")).unwrap();
        assert_eq!(since.as_deref(), Some("2026-12-07T10:00"));
        let m = sample();
        let (ok, since) = q(Some("cam"), Some("2026-12-07T09:59")).unwrap();
        assert!(ok.matches(&m, since.as_deref()));
        let (_, later) = q(None, Some("2026-12-07T10:01")).unwrap();
        assert!(!ok.matches(&m, later.as_deref()));
        // The class filter: cleaned like a label, refused when it could be none.
        let by = |l: &str| ReviewQuery { label: Some(l.into()), ..Default::default() }.checked();
        assert!(by("a/b").unwrap_err().starts_with("label:"));
        let (stain, _) = by(" Stain ").unwrap();
        assert!(!stain.matches(&m, None), "the sample's region has no label");
        let mut labelled = sample();
        labelled.regions[0].label = Some("stain".into());
        assert!(stain.matches(&labelled, None));
    }
}
