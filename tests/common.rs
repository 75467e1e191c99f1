//! Shared helpers: the detector, the shared datasets (skipped with a message when absent), pasting.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use anomalyd::config::engine::{EngineConfig, Provider};
use anomalyd::detect::detector::Detector;
use anomalyd::engine::encoder::Encoder;
use image::RgbImage;

/// One detector for the whole test binary (the encoder session is the expensive part).
pub fn detector() -> MutexGuard<'static, Detector> {
    static DET: OnceLock<Mutex<Detector>> = OnceLock::new();
    DET.get_or_init(|| {
        let cfg = EngineConfig { providers: vec![Provider::Cpu], ..EngineConfig::default() };
        let enc = Encoder::load(&cfg).unwrap_or_else(|e| panic!("{e}\n(run scripts/setup.sh first)"));
        Mutex::new(Detector::new(enc))
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

/// `../shared/datasets/<rel>` if present; otherwise prints why the caller skips and returns None.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets").join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} is absent (the shared datasets are not on this machine)", p.display());
        None
    }
}

/// Pastes `src` (a w x h patch of `donor` at (sx, sy)) into `img` at (x, y), hard-edged.
pub fn paste(img: &mut RgbImage, donor: &RgbImage, (sx, sy): (u32, u32), (x, y): (u32, u32), (w, h): (u32, u32)) {
    for dy in 0..h {
        for dx in 0..w {
            img.put_pixel(x + dx, y + dy, *donor.get_pixel(sx + dx, sy + dy));
        }
    }
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_anomalyd"))
}
