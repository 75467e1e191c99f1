//! Reloads (SIGHUP, the reload command, `POST /v1/reload`, a rollback), all or nothing.
//!
//! 1. **Check**: the new configuration is validated; a problem refuses the reload.
//! 2. **Build**, off the main loop (which keeps serving triggers, commands and the watchdog): a model for
//!    every camera that keeps its pipeline, and a detector and model for every camera that is new or
//!    whose source, trigger or queue changed. Any failure (a corrupt enrolment, a missing reference, an
//!    encoder that does not load) refuses the reload; nothing running has been touched.
//! 3. **Swap**: models are swapped in; restructured cameras are stopped after their queued frames are
//!    inspected and started again with what was built; removed cameras are stopped. A new source that
//!    cannot start (the one step that cannot be built ahead) puts that camera back on its previous
//!    configuration and model, and the reload counts as `partial`.
//!
//! Requests that arrive while a reload is being built are coalesced into one more reload after it, and
//! reloads start at most once per [`MIN_INTERVAL`]: a flood of reload commands costs a few reloads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Daemon, DaemonError, build_models, load_detector, problems, same_pipeline, stop_camera};
use crate::config::Config;
use crate::config::daemon::CameraConfig;
use crate::detect::detector::Detector;
use crate::source::intake::CameraModel;
use crate::util::sync;

/// Least time between the starts of two reloads.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// What a reload built before touching anything.
pub struct Prepared {
    new: Config,
    /// New models for cameras that keep running.
    kept: Vec<(String, Vec<Arc<CameraModel>>)>,
    /// Cameras to start (new or restructured), with their detector and models.
    fresh: Vec<(CameraConfig, Detector, Vec<Arc<CameraModel>>)>,
}

/// A reload being built, and requests that came meanwhile.
#[derive(Default)]
pub struct Reloading {
    job: Option<tokio::task::JoinHandle<Result<Prepared, DaemonError>>>,
    /// A request that waits for the running build or for [`MIN_INTERVAL`] (its reason).
    again: Option<String>,
    last_start: Option<Instant>,
}

/// Resolves when the reload being built is ready (never while none is).
pub async fn built(r: &mut Reloading) -> Result<Prepared, DaemonError> {
    match r.job.as_mut() {
        Some(job) => {
            let out = job.await;
            r.job = None;
            out.map_err(DaemonError::from).and_then(|p| p)
        }
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// A reload was asked for: starts building it, or, while one is being built or the last started
    /// less than [`MIN_INTERVAL`] ago, makes sure one more follows.
    pub(super) fn request_reload(&mut self, why: &str) {
        let busy = self.reloading.job.is_some();
        let early = self.reloading.last_start.is_some_and(|t| t.elapsed() < MIN_INTERVAL);
        if busy || early {
            if self.reloading.again.replace(why.to_string()).is_some() {
                self.metrics.reload("coalesced");
            }
            return;
        }
        self.start_reload(why);
    }

    /// True while a reload is being built.
    pub(super) fn reload_building(&self) -> bool {
        self.reloading.job.is_some()
    }

    /// On every tick: a coalesced request whose time has come.
    pub(super) fn reload_if_due(&mut self) {
        let ready =
            self.reloading.job.is_none() && self.reloading.last_start.is_none_or(|t| t.elapsed() >= MIN_INTERVAL);
        if ready && let Some(why) = self.reloading.again.take() {
            self.start_reload(&why);
        }
    }

    /// Reads the configuration file again (a daemon started without one re-enrols its running
    /// configuration), checks it and starts building.
    fn start_reload(&mut self, why: &str) {
        self.reloading.last_start = Some(Instant::now());
        let next = match &self.config_path {
            Some(p) => {
                tracing::info!("{why}: reading {}", p.display());
                Config::load(p).map_err(|e| e.to_string())
            }
            None => {
                tracing::info!("{why}: re-enrolling (no configuration file)");
                Ok(self.cfg.clone())
            }
        };
        let new = match next {
            Ok(cfg) => cfg,
            Err(e) => return self.reload_failed(&e),
        };
        let problems = problems(&new);
        if !problems.is_empty() {
            return self.reload_failed(&problems.join("; "));
        }
        for (what, changed) in [
            ("[engine]", new.engine != self.cfg.engine),
            ("[mqtt]", new.mqtt != self.cfg.mqtt),
            ("[http]", new.http != self.cfg.http),
            ("[store]", new.store != self.cfg.store),
            ("[llm]", new.llm != self.cfg.llm),
            ("daemon.node", new.daemon.node != self.cfg.daemon.node),
        ] {
            if changed {
                tracing::warn!("{what} changed: it takes effect at the next restart");
            }
        }
        let keep: Vec<String> = new
            .camera
            .iter()
            .filter(|c| self.cameras.get(&c.name).is_some_and(|rt| same_pipeline(&rt.cfg, c)))
            .map(|c| c.name.clone())
            .collect();
        let engine = self.cfg.engine.clone();
        self.reloading.job = Some(tokio::task::spawn_blocking(move || build(new, &keep, &engine)));
    }

    /// The build finished: swap it in, or report why not.
    pub(super) async fn finish_reload(&mut self, built: Result<Prepared, DaemonError>) {
        match built {
            Ok(p) => self.apply(p).await,
            Err(e) => self.reload_failed(&e.to_string()),
        }
    }

    /// Swaps a built configuration in (step 3 of the module doc).
    async fn apply(&mut self, p: Prepared) {
        let Prepared { new, kept, fresh } = p;
        for (name, models) in kept {
            let cam = sync::lock(&self.shared).get(&name).cloned();
            if let (Some(cam), Some(c)) = (cam, new.camera.iter().find(|c| c.name == name)) {
                cam.set_models(models, c.start_recipe.as_deref());
                self.recipe_metrics(&cam);
                tracing::info!(camera = %name, "enrolment {} in use", cam.model().enrolment_ref.id);
                *sync::write(&cam.trigger_timeout) = Duration::from_millis(c.trigger_timeout_ms);
                if let Some(rt) = self.cameras.get_mut(&name) {
                    rt.cfg = c.clone();
                }
            }
        }
        // Cameras removed or restructured: drain and stop; keep what a failed start goes back to.
        let mut previous: Vec<(CameraConfig, Vec<Arc<CameraModel>>)> = Vec::new();
        let names: Vec<String> = self.cameras.keys().cloned().collect();
        for name in names {
            let replacement = new.camera.iter().find(|c| c.name == name);
            let keep = replacement.is_some_and(|c| self.cameras.get(&name).is_some_and(|rt| same_pipeline(&rt.cfg, c)));
            if keep {
                continue;
            }
            if let Some(rt) = self.cameras.remove(&name) {
                if let Some(shared) = sync::lock(&self.shared).get(&name) {
                    previous.push((rt.cfg.clone(), shared.models()));
                }
                stop_camera(rt).await;
            }
            if replacement.is_none() {
                sync::lock(&self.shared).remove(&name);
                tracing::info!(camera = %name, "camera removed");
            }
        }
        let mut applied = new.clone();
        applied.engine = self.cfg.engine.clone();
        applied.mqtt = self.cfg.mqtt.clone();
        applied.http = self.cfg.http.clone();
        applied.store = self.cfg.store.clone();
        applied.llm = self.cfg.llm.clone();
        applied.daemon.node = self.cfg.daemon.node.clone();
        self.cfg = applied;
        let mut failed = Vec::new();
        for (c, detector, model) in fresh {
            let name = c.name.clone();
            let existing = sync::lock(&self.shared).get(&name).cloned();
            if let Err(e) = self.launch_camera(c, existing.clone(), detector, model).await {
                tracing::error!("reload: camera {name} did not start ({e}); putting back its previous configuration");
                failed.push(name.clone());
                self.put_back(&name, existing, &previous).await;
                if let Some((old, _)) = previous.iter().find(|(c, _)| c.name == name) {
                    self.cfg.camera.retain(|c| c.name != name);
                    self.cfg.camera.push(old.clone());
                }
            }
        }
        self.modbus_follow();
        if failed.is_empty() {
            self.metrics.reload("applied");
            tracing::info!("configuration reloaded ({} camera(s))", self.cameras.len());
        } else {
            self.metrics.reload("partial");
            tracing::error!("configuration reloaded except camera(s) {}, which run as before", failed.join(", "));
        }
    }

    /// Starts a camera again on the configuration and model it had before the reload.
    async fn put_back(
        &mut self,
        name: &str,
        existing: Option<Arc<super::CameraShared>>,
        previous: &[(CameraConfig, Vec<Arc<CameraModel>>)],
    ) {
        let Some((cfg, model)) = previous.iter().find(|(c, _)| c.name == name).cloned() else {
            sync::lock(&self.shared).remove(name);
            return;
        };
        let engine = self.cfg.engine.clone();
        let camera = name.to_string();
        let detector = tokio::task::spawn_blocking(move || load_detector(&engine, &camera)).await;
        let started = match detector {
            Ok(Ok(d)) => self.launch_camera(cfg, existing, d, model).await,
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = started {
            tracing::error!(camera = %name, "could not put the previous configuration back either: {e}");
        }
    }
}

/// Step 2 of the module doc, on a blocking thread: every model and detector the new configuration
/// needs, or the first failure.
fn build(new: Config, keep: &[String], engine: &crate::config::engine::EngineConfig) -> Result<Prepared, DaemonError> {
    crate::util::priority::yield_to_io();
    let (detect, enrolments) = (new.detect.clone(), new.daemon.enrolments.clone());
    let mut shared: Option<Detector> = None;
    let mut kept = Vec::new();
    let mut fresh = Vec::new();
    for c in &new.camera {
        if keep.contains(&c.name) {
            if shared.is_none() {
                shared = Some(load_detector(engine, &c.name)?);
            }
            if let Some(d) = shared.as_mut() {
                kept.push((c.name.clone(), build_models(d, c, &detect, &enrolments)?));
            }
        } else {
            let mut d = load_detector(engine, &c.name)?;
            let model = build_models(&mut d, c, &detect, &enrolments)?;
            fresh.push((c.clone(), d, model));
        }
    }
    Ok(Prepared { new, kept, fresh })
}
