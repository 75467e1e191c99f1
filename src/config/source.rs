//! `[camera.source]`: one camera's source, chosen by `kind`.

use serde::{Deserialize, Serialize};

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

    /// Problems with this source's settings, each naming its key. Whether its files or GStreamer
    /// elements exist on this machine is [`crate::source::check`]'s question.
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut p = Vec::new();
        match self {
            SourceConfig::Files { fps, .. } => {
                if !(0.0..=1000.0).contains(fps) {
                    p.push(format!("{key}.fps = {fps}: use 0 (as fast as inspected) to 1000"));
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
        p
    }

    /// The GStreamer element this kind cannot run without.
    pub fn required_element(&self) -> Option<&'static str> {
        match self {
            SourceConfig::Files { .. } | SourceConfig::Demo { .. } => None,
            SourceConfig::Test { .. } => Some("videotestsrc"),
            SourceConfig::Uri { .. } => Some("uridecodebin"),
            SourceConfig::V4l2 { .. } => Some("v4l2src"),
            SourceConfig::Aravis { .. } => Some("aravissrc"),
            SourceConfig::Pipeline { .. } => Some("appsink"),
        }
    }
}
