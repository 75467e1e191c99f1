//! Teaching from the station. Two lessons: a **false reject** (an NG part is declared good) and
//! **zones** (regions of the frame to ignore or to inspect, drawn on a stored frame). Either is
//! previewed (the new thresholds, the frame's new score, and which stored NG verdicts would flip),
//! applied as a new enrolment version that the camera swaps in between two frames, and rolled back.
//! Each step is kept in the audit log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use image::RgbImage;

use super::auth::Login;
use super::{UiState, stored_verdict};
use crate::config::detect::DetectConfig;
use crate::config::engine::EngineConfig;
use crate::detect::detector::Detector;
use crate::detect::enrolment::EnrolmentMeta;
use crate::detect::inspection::DetectError;
use crate::detect::zones::{self, Zone};
use crate::enrol::teach::{self, Lesson, LessonKind};
use crate::sink::audit::AuditEntry;
use crate::sink::store::{Part, Store};
use crate::source::intake::{CameraModel, CameraShared};
use crate::types::command::Command;
use crate::types::verdict::{EnrolmentRef, Outcome, VerdictMessage};
use crate::util::{imageio, sync};

/// A preview is kept this long for its Apply button.
pub const PREVIEW_TTL: Duration = Duration::from_secs(15 * 60);

/// Most previews kept at once (the oldest goes first).
const MAX_PREVIEWS: usize = 16;

/// Most stored NG frames a preview inspects again to tell which verdicts would flip.
pub const FLIP_CHECK: usize = 30;

/// A lesson waiting for its Apply.
struct Pending {
    camera: String,
    product: Option<String>,
    frame_id: String,
    /// The enrolment the lesson was made from: applying it onto another would lose that one's changes.
    base_id: String,
    lesson: Lesson,
    made: Instant,
}

/// Makes lessons: its own detector (loaded at the first lesson), and the previews waiting to be applied.
pub struct Teacher {
    engine: EngineConfig,
    detect: DetectConfig,
    detector: Mutex<Option<Detector>>,
    pending: Mutex<HashMap<String, Pending>>,
}

/// How a lesson is made on the teacher's detector from the frame's image.
type MakeLesson = Box<dyn FnOnce(&mut Detector, &DetectConfig, &RgbImage) -> Result<Lesson, DetectError> + Send>;

impl Teacher {
    pub fn new(engine: EngineConfig, detect: DetectConfig) -> Self {
        Self { engine, detect, detector: Mutex::default(), pending: Mutex::default() }
    }

    /// Runs `job` on the teacher's detector (loaded at the first use). Blocking.
    pub(super) fn with_detector<T>(
        &self,
        job: impl FnOnce(&mut Detector, &DetectConfig) -> Result<T, DetectError>,
    ) -> Result<T, String> {
        let mut slot = sync::lock(&self.detector);
        if slot.is_none() {
            *slot = Some(Detector::load(&self.engine).map_err(|e| e.to_string())?);
        }
        let det = slot.as_mut().expect("loaded above");
        job(det, &self.detect).map_err(|e| e.to_string())
    }

    /// The lesson `make` makes from `img`, and which of the stored NG frames `others` it would turn OK.
    /// Blocking (inspection).
    fn lesson(
        &self,
        make: MakeLesson,
        img: &RgbImage,
        others: &[(VerdictMessage, RgbImage)],
    ) -> Result<(Lesson, Vec<serde_json::Value>), String> {
        self.with_detector(|det, cfg| {
            let lesson = make(det, cfg, img)?;
            let mut flips = Vec::new();
            for (m, other) in others {
                let v = det.inspect(&lesson.enrolment, other)?.verdict;
                if !v.anomalous {
                    flips.push(serde_json::json!({"frame_id": m.frame_id, "before": m.score, "after": v.score}));
                }
            }
            Ok((lesson, flips))
        })
    }

    fn keep(&self, p: Pending) -> String {
        let id = super::auth::random_token()[..16].to_string();
        let mut map = sync::lock(&self.pending);
        map.retain(|_, p| p.made.elapsed() < PREVIEW_TTL);
        if map.len() >= MAX_PREVIEWS
            && let Some(oldest) = map.iter().min_by_key(|(_, p)| p.made).map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id.clone(), p);
        id
    }

    fn take(&self, id: &str) -> Option<Pending> {
        let p = sync::lock(&self.pending).remove(id)?;
        (p.made.elapsed() < PREVIEW_TTL).then_some(p)
    }
}

/// A blocking job on the blocking pool; a panic in it is an error in words.
async fn blocking<T: Send + 'static>(job: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(job).await.map_err(|e| format!("the job failed: {e}"))?
}

/// A refused or failed action: counted (by the action named in `title`'s handler) and explained.
fn refuse(ui: &UiState, login: &Login, status: StatusCode, title: &str, why: &str, back: &str) -> Response {
    ui.message(status, Some(login), title, why, back)
}

/// Counts an action's outcome: `ok` for a success, else `refused` (4xx) or `failed` (5xx).
pub(super) fn counted(ui: &UiState, action: &str, r: Response) -> Response {
    let outcome = match r.status() {
        s if s.is_success() => "ok",
        s if s.is_client_error() => "refused",
        _ => "failed",
    };
    ui.given.metrics.ui_action(action, outcome);
    r
}

/// The camera and the model of the product a frame was judged with, for teaching.
fn model_for(ui: &UiState, m: &VerdictMessage) -> Result<(Arc<CameraShared>, Arc<CameraModel>), String> {
    let cam = ui.camera(&m.camera).ok_or_else(|| format!("camera {} is not running", m.camera))?;
    let model = cam.recipe_model(m.product.as_deref()).map_err(|e| e.to_string())?;
    if model.versions.is_none() {
        return Err("this camera keeps no enrolment versions (daemon.enrolments = \"\"), so a lesson could not be \
                    rolled back: set daemon.enrolments to teach it"
            .into());
    }
    Ok((cam, model))
}

/// A stored frame's image. Blocking.
fn stored_image(store: &Store, id: &str) -> Result<RgbImage, String> {
    let bytes = store.get(id, Part::Image).ok_or_else(|| format!("frame {id}'s image is no longer stored"))?;
    imageio::decode_rgb(&bytes, std::path::Path::new(id)).map_err(|e| e.to_string())
}

/// The frame's image, and the newest stored NG frames of the same camera and product (at most
/// [`FLIP_CHECK`]) with theirs, to tell which verdicts a lesson would flip. Blocking.
fn frame_and_others(
    store: &Store,
    frame: &VerdictMessage,
) -> Result<(RgbImage, Vec<(VerdictMessage, RgbImage)>), String> {
    let img = stored_image(store, &frame.frame_id)?;
    let others = store
        .newest_verdicts(crate::control::http::MAX_FRAMES_SCANNED)
        .filter(|o| {
            o.frame_id != frame.frame_id
                && o.verdict == Outcome::Ng
                && o.camera == frame.camera
                && o.product == frame.product
        })
        .filter_map(|o| stored_image(store, &o.frame_id).ok().map(|i| (o, i)))
        .take(FLIP_CHECK)
        .collect();
    Ok((img, others))
}

/// Makes a lesson of `kind` on the frame `m` for the camera's `model` and shows its preview (kept
/// for its Apply button).
async fn preview_lesson(
    ui: &UiState,
    login: &Login,
    m: VerdictMessage,
    model: &CameraModel,
    kind: LessonKind,
    make: MakeLesson,
) -> Response {
    let back = format!("/ui/frames/{}", m.frame_id);
    let Some(store) = ui.given.store.clone() else {
        return refuse(ui, login, StatusCode::NOT_FOUND, "Cannot teach", "The flagged-frame store is off.", &back);
    };
    let work = ui.clone();
    let frame = m.clone();
    let made = blocking(move || {
        let (img, others) = frame_and_others(&store, &frame)?;
        let (lesson, flips) = work.given.teacher.lesson(make, &img, &others)?;
        Ok((lesson, flips, others.len()))
    })
    .await;
    let (lesson, flips, checked) = match made {
        Ok(x) => x,
        Err(why) => return refuse(ui, login, StatusCode::INTERNAL_SERVER_ERROR, "Cannot teach", &why, &back),
    };
    let cal = &lesson.enrolment.meta.calibration;
    let view = serde_json::json!({
        "threshold_before": lesson.threshold_before, "threshold_after": lesson.threshold_after,
        "score_before": lesson.score_before, "score_after": lesson.score_after,
        "bank_before": lesson.bank_before, "bank_after": lesson.bank_after,
        "evidence": lesson.evidence, "part_passes": lesson.part_passes(),
        "zones": lesson.enrolment.meta.zones.len(), "warnings": cal.warnings,
        "simulated_escape": cal.simulated_escape,
    });
    tracing::info!(
        user = %login.user, frame = %m.frame_id,
        "ui: {} preview: threshold {:.4} -> {:.4}, the frame {:.4} -> {:.4}, {} of {checked} stored NG frames would pass",
        kind.action(), lesson.threshold_before, lesson.threshold_after, lesson.score_before, lesson.score_after, flips.len()
    );
    let key = ui.given.teacher.keep(Pending {
        camera: m.camera.clone(),
        product: m.product.clone(),
        frame_id: m.frame_id.clone(),
        base_id: model.enrolment_ref.id.clone(),
        lesson,
        made: Instant::now(),
    });
    let ctx = serde_json::json!({
        "page": "review", "kind": kind.action(), "frame_id": m.frame_id, "camera": m.camera, "product": m.product,
        "l": view, "flips": flips, "checked": checked, "lesson": key,
    });
    ui.page(StatusCode::OK, "preview.html", Some(login), ctx)
}

/// `POST /ui/frames/{id}/false-reject`: what declaring this NG part good would change.
pub async fn preview(
    State(ui): State<UiState>,
    Extension(login): Extension<Login>,
    Path(id): Path<String>,
) -> Response {
    let back = format!("/ui/frames/{id}");
    let m = match stored_verdict(&ui, Some(&login), &id).await {
        Ok(m) => m,
        Err(r) => return *r,
    };
    if m.verdict != Outcome::Ng {
        let why = "Only an NG frame can be a false reject.";
        return refuse(&ui, &login, StatusCode::CONFLICT, "Not a reject", why, &back);
    }
    let model = match model_for(&ui, &m) {
        Ok((_, model)) => model,
        Err(why) => return refuse(&ui, &login, StatusCode::CONFLICT, "Cannot teach", &why, &back),
    };
    let taught = model.clone();
    let make: MakeLesson = Box::new(move |det, cfg, img| teach::false_reject(det, &taught.enrolment, img, cfg));
    preview_lesson(&ui, &login, m, &model, LessonKind::FalseReject, make).await
}

/// The product's reference images as it was enrolled, when every one is at hand: the built-in demo
/// part, or image files that still exist. `None` otherwise (an enrolment file, a moved folder).
fn reference_images(meta: &EnrolmentMeta) -> Option<Vec<RgbImage>> {
    meta.references
        .iter()
        .map(|name| {
            if name == crate::source::demo::REFERENCE_NAME {
                return Some(crate::source::demo::part(0, crate::source::demo::Defect::None));
            }
            let path = std::path::Path::new(name);
            if imageio::is_image(path) { imageio::load_rgb(path).ok() } else { None }
        })
        .collect()
}

/// `GET /ui/frames/{id}/zones`: the frame, with the product's zones, to draw regions to ignore or
/// inspect on.
pub async fn zones_page(State(ui): State<UiState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let login = ui.sessions.get(&headers);
    let m = match stored_verdict(&ui, login.as_ref(), &id).await {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let current = ui
        .camera(&m.camera)
        .and_then(|c| c.recipe_model(m.product.as_deref()).ok())
        .map(|model| model.enrolment.meta.zones.clone())
        .unwrap_or_default();
    let ctx = serde_json::json!({
        "page": "review", "m": m, "zones": current,
        "zones_json": serde_json::to_string(&current).unwrap_or_else(|_| "[]".into()),
        "max_zones": zones::MAX_ZONES, "max_points": zones::MAX_POINTS,
    });
    ui.page(StatusCode::OK, "zones.html", login.as_ref(), ctx)
}

/// `POST /ui/frames/{id}/zones` (form `zones`: a JSON list of zones): what these regions would change.
pub async fn zones_preview(
    State(ui): State<UiState>,
    Extension(login): Extension<Login>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let r = preview_zones(&ui, &login, &id, &body).await;
    // Only a refusal is counted here; a preview that was shown is counted when applied.
    if r.status().is_success() { r } else { counted(&ui, "zones", r) }
}

async fn preview_zones(ui: &UiState, login: &Login, id: &str, body: &[u8]) -> Response {
    let back = format!("/ui/frames/{id}/zones");
    let m = match stored_verdict(ui, Some(login), id).await {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let text = super::form_field(body, "zones").unwrap_or_default();
    let zones: Vec<Zone> = match serde_json::from_str(&text) {
        Ok(z) => z,
        Err(e) => {
            let why = format!(
                "The regions could not be read ({e}). They are a list of {{\"kind\": \"ignore\" or \"inspect\", \
                 \"points\": [[x, y], ...]}}, corners in fractions of the image. Nothing was changed."
            );
            return refuse(ui, login, StatusCode::BAD_REQUEST, "Regions refused", &why, &back);
        }
    };
    if let Err(e) = zones::check(&zones) {
        let why = format!("{e}. Nothing was changed.");
        return refuse(ui, login, StatusCode::BAD_REQUEST, "Regions refused", &why, &back);
    }
    let model = match model_for(ui, &m) {
        Ok((_, model)) => model,
        Err(why) => return refuse(ui, login, StatusCode::CONFLICT, "Cannot teach", &why, &back),
    };
    let taught = model.clone();
    let make: MakeLesson = Box::new(move |det, cfg, img| {
        let refs = reference_images(&taught.enrolment.meta);
        teach::zones(det, &taught.enrolment, img, &zones, refs.as_deref(), cfg, &mut |_| {})
    });
    preview_lesson(ui, login, m, &model, LessonKind::Zones, make).await
}

/// `POST /ui/lessons/{lesson}/apply`: the previewed lesson becomes the camera's next enrolment version
/// and is swapped in between two frames.
pub async fn apply(State(ui): State<UiState>, Extension(login): Extension<Login>, Path(key): Path<String>) -> Response {
    let Some(p) = ui.given.teacher.take(&key) else {
        let why =
            "This preview is gone: applied already, older than 15 minutes, or the daemon restarted. Preview again.";
        let r = refuse(&ui, &login, StatusCode::NOT_FOUND, "Preview gone", why, "/ui/review");
        return counted(&ui, "lesson", r);
    };
    let action = p.lesson.kind.action();
    let r = apply_lesson(&ui, &login, p).await;
    counted(&ui, action, r)
}

async fn apply_lesson(ui: &UiState, login: &Login, p: Pending) -> Response {
    let kind = p.lesson.kind;
    let (note, word, what) = match kind {
        LessonKind::FalseReject => {
            (format!("false reject {} declared good by {}", p.frame_id, login.user), "taught", "the part's score")
        }
        LessonKind::Zones => (
            format!("{} zone(s) set by {} on frame {}", p.lesson.enrolment.meta.zones.len(), login.user, p.frame_id),
            "zones",
            "the frame's score",
        ),
    };
    let l = &p.lesson;
    let details = format!(
        "frame {}: image threshold {:.4} -> {:.4}, {what} {:.4} -> {:.4}",
        p.frame_id, l.threshold_before, l.threshold_after, l.score_before, l.score_after
    );
    let change = Change {
        camera: &p.camera,
        product: p.product.as_deref(),
        base_id: &p.base_id,
        enrolment: p.lesson.enrolment.clone(),
        word,
        note,
        action: kind.action(),
        details,
    };
    install(ui, login, change, &format!("/ui/frames/{}", p.frame_id)).await
}

/// A change an operator made to a camera's enrolment, to be installed as its next version.
struct Change<'a> {
    camera: &'a str,
    product: Option<&'a str>,
    /// The enrolment the change was made from.
    base_id: &'a str,
    enrolment: crate::detect::enrolment::Enrolment,
    /// The versions' history action and the word in the model's source (`taught version 3`).
    word: &'static str,
    note: String,
    /// The audit action and what it records.
    action: &'static str,
    details: String,
}

/// Installs a change: refused when the camera's enrolment moved on since it was made; else stored as
/// the next enrolment version (with its history line), swapped in between two frames, and audited.
async fn install(ui: &UiState, login: &Login, c: Change<'_>, back: &str) -> Response {
    let Some(cam) = ui.camera(c.camera) else {
        let why = format!("camera {} is not running", c.camera);
        return refuse(ui, login, StatusCode::CONFLICT, "Cannot apply", &why, back);
    };
    let current = match cam.recipe_model(c.product) {
        Ok(m) => m,
        Err(e) => return refuse(ui, login, StatusCode::CONFLICT, "Cannot apply", &e.to_string(), back),
    };
    if current.enrolment_ref.id != c.base_id {
        let why = "The camera's enrolment changed since this was made (learning, another lesson, a rollback or a \
                   reload): do it again so that you see what would change now.";
        return refuse(ui, login, StatusCode::CONFLICT, "Cannot apply", why, back);
    }
    let Some(versions) = current.versions.clone() else {
        let why = "this camera keeps no enrolment versions";
        return refuse(ui, login, StatusCode::CONFLICT, "Cannot apply", why, back);
    };
    let (enrolment, word, note) = (c.enrolment.clone(), c.word, c.note.clone());
    let saved = blocking(move || {
        let e = |e: crate::enrol::versions::VersionError| e.to_string();
        let before = versions.active().map_err(e)?.unwrap_or(0);
        let n = versions.add_as(&enrolment, word, &note).map_err(e)?;
        Ok((before, n, crate::enrol::file::id(&enrolment)))
    })
    .await;
    let (before, n, id) = match saved {
        Ok(x) => x,
        Err(why) => return refuse(ui, login, StatusCode::INTERNAL_SERVER_ERROR, "Cannot apply", &why, back),
    };
    let base_source = current.enrolment_ref.source.split(" (").next().unwrap_or("").to_string();
    let new = CameraModel {
        recipe: current.recipe.clone(),
        words: current.words.clone(),
        enrolment: c.enrolment,
        model: current.model.clone(),
        enrolment_ref: EnrolmentRef { id, source: format!("{base_source} ({} version {n})", c.word) },
        learn_parts: None,
        versions: current.versions.clone(),
    };
    let swapped = cam.replace_model(c.base_id, Arc::new(new));
    let target = match c.product {
        Some(r) => format!("{}/{r}", c.camera),
        None => c.camera.to_string(),
    };
    let mut entry = AuditEntry::now(&login.user, c.action, &target, c.details);
    entry.version_before = Some(before);
    entry.version_after = Some(n);
    let recorded = ui.record(&entry);
    tracing::warn!(user = %login.user, camera = %c.camera, "ui: {} applied as enrolment version {n} (was {before})", c.action);
    let mut msg = format!(
        "Version {n} is active on {target}: the camera inspects with it from its next frame. Roll back on the camera's page."
    );
    if !swapped {
        msg = format!(
            "Version {n} is stored and active, but the camera's model changed meanwhile: it applies at the next reload."
        );
    }
    if let Err(e) = recorded {
        msg.push_str(&format!(" The audit log could not be written: {e}."));
    }
    let page = format!("/ui/cameras/{}", c.camera);
    ui.message(StatusCode::OK, Some(login), "Applied", &msg, &page)
}

/// `POST /ui/frames/{id}/label` (form `region`: its number from 0, `label`): the region is a defect of
/// that class; it joins the product's library at once as the camera's next enrolment version.
pub async fn label(
    State(ui): State<UiState>,
    Extension(login): Extension<Login>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let r = label_region(&ui, &login, &id, &body).await;
    counted(&ui, "label", r)
}

async fn label_region(ui: &UiState, login: &Login, id: &str, body: &[u8]) -> Response {
    let back = format!("/ui/frames/{id}");
    let m = match stored_verdict(ui, Some(login), id).await {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let text = super::form_field(body, "label").unwrap_or_default();
    let label = match crate::detect::classes::clean_label(&text) {
        Ok(l) => l,
        Err(e) => return refuse(ui, login, StatusCode::BAD_REQUEST, "Label refused", &format!("{e}."), &back),
    };
    let which = super::form_field(body, "region").and_then(|r| r.parse::<usize>().ok());
    let Some(region) = which.and_then(|i| m.regions.get(i)).cloned() else {
        let why = format!("This frame has {} region(s), numbered from 0: name one of them.", m.regions.len());
        return refuse(ui, login, StatusCode::BAD_REQUEST, "Label refused", &why, &back);
    };
    let model = match model_for(ui, &m) {
        Ok((_, model)) => model,
        Err(why) => return refuse(ui, login, StatusCode::CONFLICT, "Cannot teach", &why, &back),
    };
    let Some(store) = ui.given.store.clone() else {
        return refuse(ui, login, StatusCode::NOT_FOUND, "Cannot teach", "The flagged-frame store is off.", &back);
    };
    let (work, frame_id, user, taught, label2) =
        (ui.clone(), m.frame_id.clone(), login.user.clone(), model.clone(), label.clone());
    let made = blocking(move || {
        let img = stored_image(&store, &frame_id)?;
        work.given
            .teacher
            .with_detector(|det, _| teach::label(det, &taught.enrolment, &img, &region, &label2, &frame_id, &user))
    })
    .await;
    let enrolment = match made {
        Ok(e) => e,
        Err(why) => return refuse(ui, login, StatusCode::CONFLICT, "Cannot teach", &why, &back),
    };
    let examples = enrolment.meta.classes.iter().filter(|e| e.label == label).count();
    let change = Change {
        camera: &m.camera,
        product: m.product.as_deref(),
        base_id: &model.enrolment_ref.id,
        enrolment,
        word: "labelled",
        note: format!("a region of frame {} labelled {label} by {}", m.frame_id, login.user),
        action: "label",
        details: format!("frame {}: a region labelled {label} ({examples} example(s) of it now)", m.frame_id),
    };
    install(ui, login, change, &back).await
}

/// `GET /ui/cameras/{camera}`: each recipe's versions and history, with a rollback button.
pub async fn camera_page(State(ui): State<UiState>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let login = ui.sessions.get(&headers);
    let Some(cam) = ui.camera(&name) else {
        return ui.message(
            StatusCode::NOT_FOUND,
            login.as_ref(),
            "No such camera",
            &format!("No camera {name:?} is running."),
            "/ui/",
        );
    };
    let active = cam.model();
    let models = cam.models();
    let listed = tokio::task::spawn_blocking(move || {
        models
            .iter()
            .map(|m| {
                let key = m.recipe.clone().unwrap_or_else(|| "camera".into());
                let mut r = serde_json::json!({"key": key, "product": m.recipe, "in_use": Arc::ptr_eq(m, &active)});
                match &m.versions {
                    None => r["error"] = "No versions are kept (daemon.enrolments = \"\").".into(),
                    Some(v) => {
                        let history: Vec<serde_json::Value> = v
                            .history()
                            .unwrap_or_default()
                            .into_iter()
                            .rev()
                            .map(|c| {
                                let when = humantime::format_rfc3339_seconds(
                                    std::time::UNIX_EPOCH + Duration::from_secs(c.unix),
                                )
                                .to_string();
                                serde_json::json!({"when": when, "action": c.action, "version": c.version,
                                    "image_threshold": c.image_threshold, "note": c.note})
                            })
                            .collect();
                        r["active"] = v.active().ok().flatten().unwrap_or(0).into();
                        r["versions"] = serde_json::json!(v.list().unwrap_or_default());
                        r["history"] = history.into();
                    }
                }
                r
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    ui.page(StatusCode::OK, "camera.html", login.as_ref(), serde_json::json!({"camera": name, "recipes": listed}))
}

/// `POST /ui/cameras/{camera}/rollback` (form `product`): the version before the active one becomes
/// active, and the daemon reloads to use it.
pub async fn rollback(
    State(ui): State<UiState>,
    Extension(login): Extension<Login>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let r = roll_back(&ui, &login, &name, &body).await;
    counted(&ui, "rollback", r)
}

async fn roll_back(ui: &UiState, login: &Login, name: &str, body: &[u8]) -> Response {
    let back = format!("/ui/cameras/{name}");
    let Some(cam) = ui.camera(name) else {
        return refuse(
            ui,
            login,
            StatusCode::NOT_FOUND,
            "No such camera",
            &format!("No camera {name:?} is running."),
            "/ui/",
        );
    };
    let product = super::form_field(body, "product").filter(|p| !p.is_empty());
    let model = match cam.recipe_model(product.as_deref()) {
        Ok(m) => m,
        Err(e) => return refuse(ui, login, StatusCode::NOT_FOUND, "Cannot roll back", &e.to_string(), &back),
    };
    let Some(versions) = model.versions.clone() else {
        return refuse(
            ui,
            login,
            StatusCode::CONFLICT,
            "Cannot roll back",
            "No versions are kept for this camera.",
            &back,
        );
    };
    let done = blocking(move || {
        let before = versions.active().map_err(|e| e.to_string())?.unwrap_or(0);
        versions.rollback(None).map(|to| (before, to)).map_err(|e| e.to_string())
    })
    .await;
    let (before, to) = match done {
        Ok(x) => x,
        Err(why) => return refuse(ui, login, StatusCode::CONFLICT, "Cannot roll back", &why, &back),
    };
    let target = product.as_ref().map_or_else(|| name.to_string(), |p| format!("{name}/{p}"));
    let mut entry = AuditEntry::now(&login.user, "rollback", &target, format!("from version {before} to {to}"));
    entry.version_before = Some(before);
    entry.version_after = Some(to);
    let recorded = ui.record(&entry);
    tracing::warn!(user = %login.user, camera = %name, "ui: enrolment rolled back from version {before} to {to}; reloading");
    let mut msg =
        format!("Version {to} is active on {target} (0 is the base enrolment); the daemon reloads to use it.");
    if ui.given.commands.send(Command::Reload).is_err() {
        msg = format!("Version {to} is active on {target}, but the daemon is stopping: it applies at the next start.");
    }
    if let Err(e) = recorded {
        msg.push_str(&format!(" The audit log could not be written: {e}."));
    }
    ui.message(StatusCode::OK, Some(login), "Rolled back", &msg, &back)
}
