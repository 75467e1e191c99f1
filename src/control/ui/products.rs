//! A new product from the station: the operator uploads a few images of good parts for a camera that
//! inspects recipes; they are enrolled (the progress shown as it goes), kept as a station product
//! ([`crate::enrol::products`]) and the daemon reloads, which adds the product as a recipe the PLC
//! can select. Each step refuses bad input with the reason and keeps nothing of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Extension;
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use image::RgbImage;

use super::UiState;
use super::auth::Login;
use crate::enrol::products::{self, ProductFile};
use crate::sink::audit::AuditEntry;
use crate::types::command::Command;
use crate::util::{imageio, sync};

/// Most bytes one upload (all its images) may carry.
pub const MAX_UPLOAD: usize = 64 << 20;
/// Most bytes one image may have.
pub const MAX_IMAGE_BYTES: usize = 16 << 20;
/// Most images one product is enrolled from.
pub const MAX_IMAGES: usize = 32;
/// Longest product description.
const MAX_WORDS: usize = 200;
/// Jobs kept for their pages (the oldest finished ones go first).
const MAX_JOBS: usize = 16;

/// Where an enrolment job is.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "state", content = "message", rename_all = "snake_case")]
pub enum JobState {
    Running,
    Done(String),
    Failed(String),
}

/// One enrolment from the station, and what it has said so far.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Job {
    pub camera: String,
    pub name: String,
    pub lines: Vec<String>,
    pub state: JobState,
    #[serde(skip)]
    started: Option<Instant>,
}

/// The station's enrolment jobs.
#[derive(Default)]
pub struct Jobs(Mutex<HashMap<String, Arc<Mutex<Job>>>>);

impl Jobs {
    fn start(&self, camera: &str, name: &str) -> (String, Arc<Mutex<Job>>) {
        let id = super::auth::random_token()[..16].to_string();
        let job = Arc::new(Mutex::new(Job {
            camera: camera.into(),
            name: name.into(),
            lines: Vec::new(),
            state: JobState::Running,
            started: Some(Instant::now()),
        }));
        let mut all = sync::lock(&self.0);
        if all.len() >= MAX_JOBS {
            let finished = |j: &Arc<Mutex<Job>>| !matches!(sync::lock(j).state, JobState::Running);
            let oldest = all
                .iter()
                .filter(|(_, j)| finished(j))
                .min_by_key(|(_, j)| sync::lock(j).started)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                all.remove(&k);
            }
        }
        all.insert(id.clone(), job.clone());
        (id, job)
    }

    fn get(&self, id: &str) -> Option<Job> {
        sync::lock(&self.0).get(id).map(|j| sync::lock(j).clone())
    }

    /// Whether a job for this camera and name is running.
    fn running(&self, camera: &str, name: &str) -> bool {
        sync::lock(&self.0).values().any(|j| {
            let j = sync::lock(j);
            j.camera == camera && j.name == name && matches!(j.state, JobState::Running)
        })
    }
}

/// The cameras a product can be added to (those that inspect recipes), for the form.
fn recipe_cameras(ui: &UiState) -> Vec<String> {
    sync::lock(&ui.given.cameras)
        .iter()
        .filter(|(_, c)| c.models().iter().all(|m| m.recipe.is_some()))
        .map(|(n, _)| n.clone())
        .collect()
}

/// `GET /ui/products/new`: the form.
pub async fn new_page(State(ui): State<UiState>, headers: HeaderMap) -> Response {
    let login = ui.sessions.get(&headers);
    let ctx = serde_json::json!({"page": "line", "cameras": recipe_cameras(&ui), "max_images": MAX_IMAGES,
        "max_mib": MAX_IMAGE_BYTES >> 20});
    ui.page(StatusCode::OK, "product.html", login.as_ref(), ctx)
}

/// `GET /ui/products/jobs/{id}`: an enrolment's progress (the page reloads itself while it runs).
pub async fn job_page(State(ui): State<UiState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let login = ui.sessions.get(&headers);
    match ui.jobs.get(&id) {
        Some(job) => ui.page(StatusCode::OK, "product_job.html", login.as_ref(), serde_json::json!({"job": job})),
        None => ui.message(
            StatusCode::NOT_FOUND,
            login.as_ref(),
            "No such enrolment",
            "That enrolment is not known here (the daemon restarted, or it is long finished).",
            "/ui/products/new",
        ),
    }
}

/// `POST /ui/products` (multipart: `camera`, `name`, `product`, `images`): enrols a new product.
pub async fn create(State(ui): State<UiState>, Extension(login): Extension<Login>, form: Multipart) -> Response {
    let r = create_product(&ui, &login, form).await;
    super::teach::counted(&ui, "product", r)
}

/// The fields of the upload, checked.
struct Upload {
    camera: String,
    name: String,
    words: Option<String>,
    images: Vec<(String, RgbImage)>,
}

async fn read_upload(mut form: Multipart) -> Result<Upload, (StatusCode, String)> {
    let bad = |why: String| (StatusCode::BAD_REQUEST, why);
    let (mut camera, mut name, mut words, mut images) = (String::new(), String::new(), None, Vec::new());
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err((e.status(), format!("The upload is larger than {} MiB in all.", MAX_UPLOAD >> 20)));
            }
            Err(e) => return Err(bad(format!("The upload could not be read: {e}."))),
        };
        let key = field.name().unwrap_or_default().to_string();
        let file = field.file_name().map(str::to_string);
        let bytes = field.bytes().await.map_err(|e| bad(format!("The upload could not be read: {e}.")))?;
        match key.as_str() {
            "camera" => camera = String::from_utf8_lossy(&bytes).trim().to_string(),
            "name" => name = String::from_utf8_lossy(&bytes).trim().to_string(),
            "product" => {
                let w = String::from_utf8_lossy(&bytes).trim().to_string();
                words = (!w.is_empty()).then_some(w);
            }
            "images" => {
                let file = file.unwrap_or_else(|| format!("image {}", images.len() + 1));
                if bytes.is_empty() {
                    continue;
                }
                if bytes.len() > MAX_IMAGE_BYTES {
                    let why = format!(
                        "{file} is {} MiB; an image may be {} MiB at most.",
                        bytes.len() >> 20,
                        MAX_IMAGE_BYTES >> 20
                    );
                    return Err((StatusCode::PAYLOAD_TOO_LARGE, why));
                }
                if images.len() == MAX_IMAGES {
                    return Err(bad(format!("At most {MAX_IMAGES} images: a few good parts are enough.")));
                }
                let img = imageio::decode_rgb(&bytes, std::path::Path::new(&file))
                    .map_err(|e| bad(format!("{file} is not an image this station reads ({e}).")))?;
                images.push((file, img));
            }
            _ => {}
        }
    }
    if !crate::config::daemon::valid_name(&name) {
        return Err(bad(format!(
            "The product's name {name:?} must be 1 to 64 letters, digits, '-' or '_': the PLC selects it by this name."
        )));
    }
    if words.as_ref().is_some_and(|w| w.chars().count() > MAX_WORDS) {
        return Err(bad(format!("The product's description is longer than {MAX_WORDS} characters.")));
    }
    if images.is_empty() {
        return Err(bad("No image was uploaded: give a few images of good parts.".into()));
    }
    Ok(Upload { camera, name, words, images })
}

async fn create_product(ui: &UiState, login: &Login, form: Multipart) -> Response {
    let back = "/ui/products/new";
    let up = match read_upload(form).await {
        Ok(u) => u,
        Err((status, why)) => {
            return ui.message(status, Some(login), "Upload refused", &format!("{why} Nothing was kept."), back);
        }
    };
    let refuse = |why: String| ui.message(StatusCode::CONFLICT, Some(login), "Cannot enrol", &why, back);
    let Some(cam) = ui.camera(&up.camera) else {
        return refuse(format!("No camera {:?} is running.", up.camera));
    };
    if cam.models().iter().any(|m| m.recipe.is_none()) {
        return refuse(format!(
            "Camera {} inspects one product (camera.reference): give it [[camera.recipe]] entries in the \
             configuration so that the PLC can switch between products.",
            up.camera
        ));
    }
    if cam.recipe_model(Some(&up.name)).is_ok() || ui.jobs.running(&up.camera, &up.name) {
        return refuse(format!("Camera {} has a product named {} already.", up.camera, up.name));
    }
    let root = ui.given.enrolments.clone();
    if root.as_os_str().is_empty() {
        return refuse("daemon.enrolments is off (\"\"): a product enrolled here could not be kept.".into());
    }
    let (id, job) = ui.jobs.start(&up.camera, &up.name);
    let (work, user) = (ui.clone(), login.user.clone());
    tracing::info!(user = %user, camera = %up.camera, "ui: enrolling new product {} from {} image(s)", up.name, up.images.len());
    tokio::task::spawn_blocking(move || {
        let say = |line: String| sync::lock(&job).lines.push(line);
        say(format!("{} image(s) received for product {} of camera {}.", up.images.len(), up.name, up.camera));
        let enrolled = work.given.teacher.with_detector(|det, cfg| {
            det.enroll(&up.images, cfg, &mut |m: &str| sync::lock(&job).lines.push(m.to_string()))
        });
        let state = match enrolled {
            Err(why) => JobState::Failed(format!("The images could not be enrolled: {why}. Nothing was kept.")),
            Ok(e) => {
                say(format!("enrolled: image threshold {:.4}", e.meta.thresholds.image));
                let unix =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let file = ProductFile { product: up.words.clone(), by: user.clone(), unix };
                let images: Vec<RgbImage> = up.images.into_iter().map(|(_, i)| i).collect();
                match products::save(&root, &up.camera, &up.name, &file, &images) {
                    Err(e) => JobState::Failed(format!("The product could not be kept: {e}. Nothing was kept.")),
                    Ok(dir) => {
                        say(format!("kept in {}", dir.display()));
                        let entry = AuditEntry::now(
                            &user,
                            "product",
                            &format!("{}/{}", up.camera, up.name),
                            format!(
                                "new product from {} image(s), image threshold {:.4}",
                                images.len(),
                                e.meta.thresholds.image
                            ),
                        );
                        let mut msg = format!(
                            "Product {} is enrolled. The daemon reloads to add it to camera {}'s recipes; the PLC \
                             selects it by its name.",
                            up.name, up.camera
                        );
                        if let Err(e) = work.record(&entry) {
                            msg.push_str(&format!(" The audit log could not be written: {e}."));
                        }
                        if work.given.commands.send(Command::Reload).is_err() {
                            msg = format!(
                                "Product {} is kept; the daemon is stopping: it is added at the next start.",
                                up.name
                            );
                        }
                        JobState::Done(msg)
                    }
                }
            }
        };
        if let JobState::Failed(why) = &state {
            tracing::warn!(camera = %up.camera, "ui: new product {}: {why}", up.name);
        }
        sync::lock(&job).state = state;
    });
    Redirect::to(&format!("/ui/products/jobs/{id}")).into_response()
}
