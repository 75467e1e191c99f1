//! One captured frame on its way to a verdict.

use std::time::{Instant, SystemTime};

use image::RgbImage;

/// One captured frame on its way to a verdict.
#[derive(Debug)]
pub struct Frame {
    pub seq: u64,
    pub id: String,
    pub part_id: Option<String>,
    /// The recipe the frame is judged with: the one in use when it was captured, or its trigger's.
    pub recipe: Option<String>,
    pub captured: SystemTime,
    pub captured_at: Instant,
    /// The RGB frame, or why it could not be decoded (which becomes an ERROR verdict).
    pub image: Result<RgbImage, String>,
}
