//! The verdict message published on `anomalyd/<node>/<camera>/verdict`. `docs/MQTT.md` is the
//! contract; its JSON examples are parsed into these types by a test, so the two cannot drift.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::types::findings::Region;

/// Bumped on any change a subscriber could notice; additions of optional fields keep the number.
pub const SCHEMA: u32 = 1;

/// The four outcomes. Every frame that enters the pipeline leaves with exactly one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Outcome {
    /// Inspected, no anomaly.
    Ok,
    /// Inspected, anomalous ("no good").
    Ng,
    /// Not inspected: the frame could not be inspected in time (the reason says why).
    Skipped,
    /// Not inspected: decoding or inference failed (the reason says why).
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Ng => "NG",
            Outcome::Skipped => "SKIPPED",
            Outcome::Error => "ERROR",
        }
    }
}

/// Milliseconds spent in each stage; stages a frame never reached are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Waiting in the camera's inspection queue.
    pub queue: f32,
    pub preprocess: f32,
    pub encoder: f32,
    pub decoder: f32,
    /// From the end of inspection to the hand-over to the MQTT client.
    pub publish: f32,
    /// Capture to hand-over.
    pub total: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrolmentRef {
    /// First 16 hex digits of the enrolment's sha256: changes whenever the enrolment does.
    pub id: String,
    /// Enrolment file or reference folder it came from.
    pub source: String,
}

/// One verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictMessage {
    pub schema: u32,
    pub node: String,
    pub camera: String,
    /// Unique across cameras and restarts: `<camera>-<start time, hex ms>-<sequence>`.
    pub frame_id: String,
    /// Frame number of this camera since the daemon started, from 1.
    pub seq: u64,
    /// The part id a PLC trigger carried; null for every-frame cameras.
    pub part_id: Option<String>,
    pub captured_at: String,
    pub captured_unix_ms: u64,
    pub published_at: String,
    pub published_unix_ms: u64,
    pub verdict: Outcome,
    /// Why a frame was SKIPPED or an ERROR; null for OK and NG.
    pub reason: Option<String>,
    pub score: Option<f32>,
    pub threshold: Option<f32>,
    pub regions: Vec<Region>,
    /// The verdict in words (AnomalyGPT's answer format).
    pub answer: Option<String>,
    /// Size of the frame as captured.
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub model: ModelRef,
    /// The recipe (product) the frame was judged with; null for a camera without recipes.
    #[serde(default)]
    pub product: Option<String>,
    pub enrolment: Option<EnrolmentRef>,
    pub latency_ms: Latency,
    /// Where the stored NG frame can be fetched (HTTP API), when the store kept it.
    pub frame_url: Option<String>,
    /// True when the message is sent again from the outbox after an outage.
    pub replayed: bool,
    /// True while line mode learns from the camera's first parts: the verdict used the enrolment's
    /// threshold, which learning is about to refine.
    #[serde(default)]
    pub learning: bool,
}

/// A verdict on its way out, with the capture instant its latencies are measured from.
#[derive(Debug)]
pub struct Outgoing {
    pub msg: VerdictMessage,
    pub captured_at: Instant,
}

pub type VerdictTx = tokio::sync::mpsc::UnboundedSender<Outgoing>;

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64
}

/// True for a frame id the daemon could have made: letters, digits, `-`, `_`, `.` (not leading), at most 160.
/// Anything else (a path, `..`) is refused before it reaches the file system.
pub fn valid_frame_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 160
        && !id.starts_with('.')
        && !id.contains("..")
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_ids_cannot_name_paths() {
        assert!(valid_frame_id("cam1-18c2f3a1b00-42"));
        for bad in ["", "../etc/passwd", "a/b", "..", ".hidden", "a\\b", "x%2e%2e", "a b"] {
            assert!(!valid_frame_id(bad), "{bad}");
        }
    }

    #[test]
    fn outcome_serialises_uppercase() {
        assert_eq!(serde_json::to_string(&Outcome::Skipped).unwrap(), "\"SKIPPED\"");
    }
}
