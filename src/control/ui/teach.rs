//! Teaching from the station: a false reject is previewed (new thresholds, the part's new score, and
//! which stored NG verdicts would flip), applied as a new enrolment version that the camera swaps in
//! between two frames, and rolled back. Each step is kept in the audit log.

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
use crate::enrol::teach::{self, Lesson};
use crate::sink::audit::AuditEntry;
use crate::sink::store::Part;
use crate::source::intake::{CameraModel, CameraShared};
use crate::types::command::Command;
use crate::types::verdict::{EnrolmentRef, VerdictMessage};
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

impl Teacher {
    pub fn new(engine: EngineConfig, detect: DetectConfig) -> Self {
        Self { engine, detect, detector: Mutex::default(), pending: Mutex::default() }
    }

    /// The lesson for `img` on `model`, and the stored frames it would turn OK. Blocking (inspection).
    fn lesson(
        &self,
        model: &CameraModel,
        img: &RgbImage,
        others: &[(VerdictMessage, RgbImage)],
    ) -> Result<(Lesson, Vec<serde_json::Value>), String> {
        let mut slot = sync::lock(&self.detector);
        if slot.is_none() {
            *slot = Some(Detector::load(&self.engine).map_err(|e| e.to_string())?);
        }
        let det = slot.as_mut().expect("loaded above");
        let lesson = teach::false_reject(det, &model.enrolment, img, &self.detect).map_err(|e| e.to_string())?;
        let mut flips = Vec::new();
        for (m, other) in others {
            let v = det.inspect(&lesson.enrolment, other).map_err(|e| e.to_string())?.verdict;
            if !v.anomalous {
                flips.push(serde_json::json!({"frame_id": m.frame_id, "before": m.score, "after": v.score}));
            }
        }
        Ok((lesson, flips))
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

/// A refused or failed action: counted (by the action named in `title`'s handler) and explained.
fn refuse(ui: &UiState, login: &Login, status: StatusCode, title: &str, why: &str, back: &str) -> Response {
    ui.message(status, Some(login), title, why, back)
}

/// Counts an action's outcome: `ok` for a success, else `refused` (4xx) or `failed` (5xx).
fn counted(ui: &UiState, action: &str, r: Response) -> Response {
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
    if m.verdict != crate::types::verdict::Outcome::Ng {
        return refuse(
            &ui,
            &login,
            StatusCode::CONFLICT,
            "Not a reject",
            "Only an NG frame can be a false reject.",
            &back,
        );
    }
    let (_, model) = match model_for(&ui, &m) {
        Ok(x) => x,
        Err(why) => return refuse(&ui, &login, StatusCode::CONFLICT, "Cannot teach", &why, &back),
    };
    let Some(store) = ui.given.store.clone() else {
        return refuse(&ui, &login, StatusCode::NOT_FOUND, "Cannot teach", "The flagged-frame store is off.", &back);
    };
    let work = ui.clone();
    let frame = m.clone();
    let model2 = model.clone();
    let made = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let bytes = store.get(&frame.frame_id, Part::Image).ok_or("the frame's image is no longer stored")?;
        let img = imageio::decode_rgb(&bytes, std::path::Path::new(&frame.frame_id)).map_err(|e| e.to_string())?;
        // The newest stored NG frames of the same camera and product, to tell which would flip.
        let mut others = Vec::new();
        for oid in store.recent(crate::control::http::MAX_FRAMES_SCANNED).iter().rev() {
            if others.len() == FLIP_CHECK {
                break;
            }
            if *oid == frame.frame_id {
                continue;
            }
            let Some(o) = store.get(oid, Part::Verdict).and_then(|b| serde_json::from_slice::<VerdictMessage>(&b).ok())
            else {
                continue;
            };
            if o.camera != frame.camera || o.product != frame.product {
                continue;
            }
            if let Some(oimg) =
                store.get(oid, Part::Image).and_then(|b| imageio::decode_rgb(&b, std::path::Path::new(oid)).ok())
            {
                others.push((o, oimg));
            }
        }
        let checked = others.len();
        let (lesson, flips) = work.given.teacher.lesson(&model2, &img, &others)?;
        Ok((lesson, flips, checked))
    })
    .await;
    let (lesson, flips, checked) = match made {
        Ok(Ok(x)) => x,
        Ok(Err(why)) => return refuse(&ui, &login, StatusCode::INTERNAL_SERVER_ERROR, "Cannot teach", &why, &back),
        Err(e) => return refuse(&ui, &login, StatusCode::INTERNAL_SERVER_ERROR, "Cannot teach", &e.to_string(), &back),
    };
    let view = serde_json::json!({
        "threshold_before": lesson.threshold_before, "threshold_after": lesson.threshold_after,
        "score_before": lesson.score_before, "score_after": lesson.score_after,
        "bank_before": lesson.bank_before, "bank_after": lesson.bank_after,
        "evidence": lesson.evidence, "part_passes": lesson.part_passes(),
    });
    tracing::info!(
        user = %login.user, frame = %m.frame_id,
        "ui: false-reject preview: threshold {:.4} -> {:.4}, the part {:.4} -> {:.4}, {} of {checked} stored NG frames would pass",
        lesson.threshold_before, lesson.threshold_after, lesson.score_before, lesson.score_after, flips.len()
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
        "page": "review", "frame_id": m.frame_id, "camera": m.camera, "product": m.product, "l": view,
        "flips": flips, "checked": checked, "lesson": key,
    });
    ui.page(StatusCode::OK, "preview.html", Some(&login), ctx)
}

/// `POST /ui/lessons/{lesson}/apply`: the previewed lesson becomes the camera's next enrolment version
/// and is swapped in between two frames.
pub async fn apply(State(ui): State<UiState>, Extension(login): Extension<Login>, Path(key): Path<String>) -> Response {
    let r = apply_lesson(&ui, &login, &key).await;
    counted(&ui, "false_reject", r)
}

async fn apply_lesson(ui: &UiState, login: &Login, key: &str) -> Response {
    let Some(p) = ui.given.teacher.take(key) else {
        return refuse(
            ui,
            login,
            StatusCode::NOT_FOUND,
            "Preview gone",
            "This preview is gone: applied already, older than 15 minutes, or the daemon restarted. Preview again.",
            "/ui/review",
        );
    };
    let back = format!("/ui/frames/{}", p.frame_id);
    let Some(cam) = ui.camera(&p.camera) else {
        return refuse(
            ui,
            login,
            StatusCode::CONFLICT,
            "Cannot apply",
            &format!("camera {} is not running", p.camera),
            &back,
        );
    };
    let current = match cam.recipe_model(p.product.as_deref()) {
        Ok(m) => m,
        Err(e) => return refuse(ui, login, StatusCode::CONFLICT, "Cannot apply", &e.to_string(), &back),
    };
    if current.enrolment_ref.id != p.base_id {
        return refuse(
            ui,
            login,
            StatusCode::CONFLICT,
            "Cannot apply",
            "The camera's enrolment changed since this preview (learning, another lesson, a rollback or a reload): \
             preview again so that you see what would change now.",
            &back,
        );
    }
    let Some(versions) = current.versions.clone() else {
        return refuse(
            ui,
            login,
            StatusCode::CONFLICT,
            "Cannot apply",
            "this camera keeps no enrolment versions",
            &back,
        );
    };
    let note = format!("false reject {} declared good by {}", p.frame_id, login.user);
    let enrolment = p.lesson.enrolment.clone();
    let saved = tokio::task::spawn_blocking(move || {
        let before = versions.active()?.unwrap_or(0);
        let n = versions.add_as(&enrolment, "taught", &note)?;
        Ok::<_, crate::enrol::versions::VersionError>((before, n, crate::enrol::file::id(&enrolment)))
    })
    .await;
    let (before, n, id) = match saved {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            return refuse(ui, login, StatusCode::INTERNAL_SERVER_ERROR, "Cannot apply", &e.to_string(), &back);
        }
        Err(e) => return refuse(ui, login, StatusCode::INTERNAL_SERVER_ERROR, "Cannot apply", &e.to_string(), &back),
    };
    let base_source = current.enrolment_ref.source.split(" (").next().unwrap_or("").to_string();
    let new = CameraModel {
        recipe: current.recipe.clone(),
        words: current.words.clone(),
        enrolment: p.lesson.enrolment,
        model: current.model.clone(),
        enrolment_ref: EnrolmentRef { id, source: format!("{base_source} (taught version {n})") },
        learn_parts: None,
        versions: current.versions.clone(),
    };
    let swapped = cam.replace_model(&p.base_id, Arc::new(new));
    let target = match &p.product {
        Some(r) => format!("{}/{r}", p.camera),
        None => p.camera.clone(),
    };
    let mut entry = AuditEntry::now(
        &login.user,
        "false_reject",
        &target,
        format!(
            "frame {}: image threshold {:.4} -> {:.4}, the part's score {:.4} -> {:.4}",
            p.frame_id,
            p.lesson.threshold_before,
            p.lesson.threshold_after,
            p.lesson.score_before,
            p.lesson.score_after
        ),
    );
    entry.version_before = Some(before);
    entry.version_after = Some(n);
    let recorded = ui.record(&entry);
    tracing::warn!(user = %login.user, camera = %p.camera, "ui: false-reject lesson applied as enrolment version {n} (was {before})");
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
    let page = format!("/ui/cameras/{}", p.camera);
    ui.message(StatusCode::OK, Some(login), "Applied", &msg, &page)
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
    let done = tokio::task::spawn_blocking(move || {
        let before = versions.active()?.unwrap_or(0);
        versions.rollback(None).map(|to| (before, to))
    })
    .await;
    let (before, to) = match done {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return refuse(ui, login, StatusCode::CONFLICT, "Cannot roll back", &e.to_string(), &back),
        Err(e) => {
            return refuse(ui, login, StatusCode::INTERNAL_SERVER_ERROR, "Cannot roll back", &e.to_string(), &back);
        }
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
