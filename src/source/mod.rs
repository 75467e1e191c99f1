//! Camera sources. Each kind is one file; every source runs on its own thread, pushes frames into
//! its camera's [`FrameSink`] and returns how it ended. Stopping is a flag passed in (the sink's).
//!
//! - `files` and `demo` decode and generate in Rust: replay then decodes exactly as `anomalyd
//!   inspect` does, so the daemon's verdicts match it image for image.
//! - `uri`, `v4l2`, `test`, `aravis` and `pipeline` run through GStreamer ([`gst`]).

use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::daemon::frame::FrameSink;

pub mod demo;
pub mod files;
#[cfg(feature = "gstreamer")]
pub mod gst;

/// One camera's source, chosen by `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SourceConfig {
    /// A folder (every image under it, sorted) or a glob (`dir/*.png`) of images, for replay and tests.
    Files {
        path: String,
        /// Frames per second to replay at, as a live camera would (a full queue then SKIPs);
        /// 0 = as fast as they are inspected, waiting for room (nothing skipped).
        #[serde(default)]
        fps: f32,
        /// Start again at the first image after the last.
        #[serde(default)]
        repeat: bool,
    },
    /// Generated demo parts, every `defect_every`-th one defective; needs no camera or dataset.
    Demo {
        #[serde(default = "demo_fps")]
        fps: f32,
        /// Parts to make, then end (0 = endless).
        #[serde(default = "demo_frames")]
        frames: u64,
        #[serde(default = "demo_defect_every")]
        defect_every: u64,
    },
    /// GStreamer's videotestsrc (a live test pattern).
    Test {
        #[serde(default = "test_pattern")]
        pattern: String,
        #[serde(default = "test_width")]
        width: u32,
        #[serde(default = "test_height")]
        height: u32,
        #[serde(default = "test_fps")]
        fps: u32,
        /// Frames, then end (0 = endless).
        #[serde(default)]
        frames: u64,
    },
    /// Anything uridecodebin plays: file://, rtsp://, http(s)://.
    Uri { uri: String },
    /// A V4L2 device; width/height/fps ask the driver for a mode (0 = its default).
    V4l2 {
        #[serde(default = "v4l2_device")]
        device: String,
        #[serde(default)]
        width: u32,
        #[serde(default)]
        height: u32,
        #[serde(default)]
        fps: u32,
    },
    /// GigE Vision / USB3 Vision through the aravis GStreamer plugin (aravissrc).
    Aravis {
        /// Camera name as aravis lists it (arv-tool); unset = the first camera found.
        #[serde(default)]
        camera: Option<String>,
    },
    /// A raw GStreamer pipeline that ends in `appsink name=sink`; anomalyd asks it for RGB.
    Pipeline { description: String },
}

fn demo_fps() -> f32 {
    5.0
}
const fn demo_frames() -> u64 {
    30
}
const fn demo_defect_every() -> u64 {
    3
}
fn test_pattern() -> String {
    "smpte".into()
}
const fn test_width() -> u32 {
    640
}
const fn test_height() -> u32 {
    480
}
const fn test_fps() -> u32 {
    10
}
fn v4l2_device() -> String {
    "/dev/video0".into()
}

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
    pub fn demo_default() -> Self {
        SourceConfig::Demo { fps: demo_fps(), frames: demo_frames(), defect_every: demo_defect_every() }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Files { .. } => "files",
            SourceConfig::Demo { .. } => "demo",
            SourceConfig::Test { .. } => "test",
            SourceConfig::Uri { .. } => "uri",
            SourceConfig::V4l2 { .. } => "v4l2",
            SourceConfig::Aravis { .. } => "aravis",
            SourceConfig::Pipeline { .. } => "pipeline",
        }
    }

    pub fn is_demo(&self) -> bool {
        matches!(self, SourceConfig::Demo { .. })
    }

    /// A live source delivers at its own pace: a full queue SKIPs its frames. Replay at fps 0 waits.
    pub fn is_live(&self) -> bool {
        match self {
            SourceConfig::Files { fps, .. } => *fps > 0.0,
            SourceConfig::Demo { fps, .. } => *fps > 0.0,
            SourceConfig::Uri { uri } => !uri.starts_with("file:"),
            _ => true,
        }
    }

    /// True when the stream has a natural end (replayed files, a counted demo or test pattern, a
    /// video file): its EOS is final. A camera's EOS is a fault, and the camera is restarted.
    pub fn ends_by_itself(&self) -> bool {
        match self {
            SourceConfig::Files { repeat, .. } => !repeat,
            SourceConfig::Demo { frames, .. } | SourceConfig::Test { frames, .. } => *frames > 0,
            SourceConfig::Uri { uri } => uri.starts_with("file:"),
            _ => false,
        }
    }

    /// Problems with this source's settings, each naming its key.
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut p = Vec::new();
        match self {
            SourceConfig::Files { path, fps, .. } => {
                if !(0.0..=1000.0).contains(fps) {
                    p.push(format!("{key}.fps = {fps}: use 0 (as fast as inspected) to 1000"));
                }
                match files::list(path) {
                    Ok(v) if v.is_empty() => p.push(format!("{key}.path = {path:?} matches no image files")),
                    Ok(_) => {}
                    Err(e) => p.push(format!("{key}.path = {path:?}: {e}")),
                }
            }
            SourceConfig::Demo { fps, defect_every, .. } => {
                if !(0.0..=1000.0).contains(fps) {
                    p.push(format!("{key}.fps = {fps}: use 0 (as fast as inspected) to 1000"));
                }
                if *defect_every == 0 {
                    p.push(format!("{key}.defect_every = 0: use 1 or more"));
                }
            }
            SourceConfig::Test { width, height, fps, .. } => {
                if !(16..=8192).contains(width) || !(16..=8192).contains(height) {
                    p.push(format!("{key}: width and height must be 16..=8192"));
                }
                if !(1..=240).contains(fps) {
                    p.push(format!("{key}.fps = {fps}: use 1..=240"));
                }
            }
            SourceConfig::Uri { uri } => {
                if !uri.contains("://") {
                    p.push(format!(
                        "{key}.uri = {uri:?}: use a URI such as file:///path/video.mp4 or rtsp://host/stream"
                    ));
                }
            }
            SourceConfig::V4l2 { device, .. } => {
                if device.is_empty() {
                    p.push(format!("{key}.device is empty: use e.g. /dev/video0"));
                }
            }
            SourceConfig::Aravis { .. } => {}
            SourceConfig::Pipeline { description } => {
                if !description.contains("appsink") {
                    p.push(format!("{key}.description must end in `appsink name=sink`"));
                }
            }
        }
        if let Some(element) = self.required_element()
            && let Err(e) = gst_element_available(element)
        {
            p.push(format!("{key}: {e}"));
        }
        p
    }

    /// The GStreamer element this kind cannot run without.
    fn required_element(&self) -> Option<&'static str> {
        match self {
            SourceConfig::Files { .. } | SourceConfig::Demo { .. } => None,
            SourceConfig::Test { .. } => Some("videotestsrc"),
            SourceConfig::Uri { .. } => Some("uridecodebin"),
            SourceConfig::V4l2 { .. } => Some("v4l2src"),
            SourceConfig::Aravis { .. } => Some("aravissrc"),
            SourceConfig::Pipeline { .. } => Some("appsink"),
        }
    }

    /// Starts the source on its own thread.
    pub fn start(&self, sink: FrameSink) -> Result<SourceHandle, SourceError> {
        let camera = sink.camera.name.clone();
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
                spawn(&camera.clone(), Box::new(move || files::run(files, fps, repeat, sink)))
            }
            SourceConfig::Demo { fps, frames, defect_every } => {
                spawn(&camera.clone(), Box::new(move || demo::run(fps, frames, defect_every, sink)))
            }
            #[cfg(feature = "gstreamer")]
            other => {
                let description = gst::description(&other);
                gst::check_element(other.required_element().unwrap_or("appsink"))
                    .map_err(|reason| SourceError::Start { camera: camera.clone(), reason })?;
                spawn(&camera.clone(), Box::new(move || gst::run(&description, sink)))
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

#[cfg(feature = "gstreamer")]
fn gst_element_available(element: &str) -> Result<(), String> {
    gst::check_element(element)
}

#[cfg(not(feature = "gstreamer"))]
fn gst_element_available(element: &str) -> Result<(), String> {
    Err(format!("needs GStreamer element {element}, and this anomalyd was built without the `gstreamer` feature"))
}

/// Sleeps until `deadline` in short steps so that a stop request is noticed; false when stopped.
pub(crate) fn pace(deadline: std::time::Instant, sink: &FrameSink) -> bool {
    loop {
        if sink.stopping() {
            return false;
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(std::time::Duration::from_millis(50)));
    }
}
