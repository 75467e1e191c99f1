//! Camera sources. Each kind is one file; every source runs on its own thread, pushes frames into
//! its camera's [`Intake`] and returns how it ended. Stopping is a flag passed in (the intake's).
//!
//! - `files` and `demo` decode and generate in Rust: replay then decodes exactly as `anomalyd
//!   inspect` does, so the daemon's verdicts match it image for image.
//! - `uri`, `v4l2`, `test`, `aravis` and `pipeline` run through GStreamer ([`gst`]).

use std::thread::JoinHandle;

use crate::config::source::SourceConfig;
use crate::source::intake::Intake;

pub mod demo;
pub mod files;
#[cfg(feature = "gstreamer")]
pub mod gst;
pub mod intake;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("camera {camera}: {reason}")]
    Start { camera: String, reason: String },
}

/// How a source ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEnd {
    /// The stream ended (replay finished, test pattern's frame count reached).
    Eos,
    /// Stopped by the daemon.
    Stopped,
    /// The source failed and stopped.
    Failed(String),
}

/// A running source.
#[derive(Debug)]
pub struct SourceHandle {
    pub thread: JoinHandle<SourceEnd>,
}

impl SourceConfig {
    /// Starts the source on its own thread.
    pub fn start(&self, intake: Intake) -> Result<SourceHandle, SourceError> {
        let camera = intake.camera.name.clone();
        let spawn = |name: &str, f: Box<dyn FnOnce() -> SourceEnd + Send>| {
            std::thread::Builder::new()
                .name(format!("src-{name}"))
                .spawn(f)
                .map(|thread| SourceHandle { thread })
                .map_err(|e| SourceError::Start { camera: name.into(), reason: e.to_string() })
        };
        match self.clone() {
            SourceConfig::Files { path, fps, repeat } => {
                let files =
                    files::list(&path).map_err(|reason| SourceError::Start { camera: camera.clone(), reason })?;
                if files.is_empty() {
                    return Err(SourceError::Start { camera, reason: format!("{path:?} matches no image files") });
                }
                spawn(&camera.clone(), Box::new(move || files::run(files, fps, repeat, intake)))
            }
            SourceConfig::Demo { fps, frames, defect_every } => {
                spawn(&camera.clone(), Box::new(move || demo::run(fps, frames, defect_every, intake)))
            }
            #[cfg(feature = "gstreamer")]
            other => {
                let description = gst::description(&other);
                gst::check_element(other.required_element().unwrap_or("appsink"))
                    .map_err(|reason| SourceError::Start { camera: camera.clone(), reason })?;
                spawn(&camera.clone(), Box::new(move || gst::run(&description, intake)))
            }
            #[cfg(not(feature = "gstreamer"))]
            other => Err(SourceError::Start {
                camera,
                reason: format!(
                    "source kind {:?} needs GStreamer, and this anomalyd was built without the `gstreamer` feature",
                    other.kind()
                ),
            }),
        }
    }
}

/// What this machine lacks to run a source: its files, or the GStreamer element it needs; each problem
/// names its key.
pub fn check(source: &SourceConfig, key: &str) -> Vec<String> {
    let mut p = Vec::new();
    if let SourceConfig::Files { path, .. } = source {
        match files::list(path) {
            Ok(v) if v.is_empty() => p.push(format!("{key}.path = {path:?} matches no image files")),
            Ok(_) => {}
            Err(e) => p.push(format!("{key}.path = {path:?}: {e}")),
        }
    }
    if let Some(element) = source.required_element()
        && let Err(e) = gst_element_available(element)
    {
        p.push(format!("{key}: {e}"));
    }
    p
}

#[cfg(feature = "gstreamer")]
fn gst_element_available(element: &str) -> Result<(), String> {
    gst::check_element(element)
}

#[cfg(not(feature = "gstreamer"))]
fn gst_element_available(element: &str) -> Result<(), String> {
    Err(format!("needs GStreamer element {element}, and this anomalyd was built without the `gstreamer` feature"))
}

/// Sleeps until `deadline` in short steps so that a stop request is noticed; false when stopped.
pub(crate) fn pace(deadline: std::time::Instant, intake: &Intake) -> bool {
    loop {
        if intake.stopping() {
            return false;
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(std::time::Duration::from_millis(50)));
    }
}
