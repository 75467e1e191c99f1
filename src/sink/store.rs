//! The flagged-frame store: each NG frame kept as `<id>.jpg` (the frame), `<id>.overlay.jpg` (its
//! heat map) and `<id>.json` (its verdict), the oldest deleted first to stay under a byte budget.
//! Writes happen on the store's own thread; a full store queue never holds up a verdict.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use image::RgbImage;

use crate::config::daemon::StoreConfig;
use crate::detect::inspection::Inspection;
use crate::detect::overlay;
use crate::telemetry::Metrics;
use crate::types::verdict::{VerdictMessage, valid_frame_id};
use crate::util::sync;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("flagged-frame store {path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
}

/// What the worker hands over for an NG frame.
#[derive(Debug)]
pub struct StoreJob {
    pub msg: VerdictMessage,
    pub image: RgbImage,
    /// Rendered into the heat-map overlay on the store's thread, off the frame path.
    pub inspection: Inspection,
}

/// Which file of a stored frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Verdict,
    Image,
    Overlay,
}

impl Part {
    fn suffix(self) -> &'static str {
        match self {
            Part::Verdict => ".json",
            Part::Image => ".jpg",
            Part::Overlay => ".overlay.jpg",
        }
    }
    pub fn content_type(self) -> &'static str {
        match self {
            Part::Verdict => "application/json",
            _ => "image/jpeg",
        }
    }
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    max_bytes: u64,
    quality: u8,
    /// (frame id, bytes on disk), oldest first.
    index: Mutex<(VecDeque<(String, u64)>, u64)>,
    metrics: Arc<Metrics>,
}

impl Store {
    /// Opens (creating) the folder and indexes what an earlier run left, oldest first.
    pub fn open(cfg: &StoreConfig, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        let dir = cfg.dir.clone();
        let io = |cause| StoreError::Io { path: dir.clone(), cause };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut found: Vec<(SystemTime, String, u64)> = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else { continue };
            let mtime = entry.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            let bytes = [Part::Verdict, Part::Image, Part::Overlay]
                .iter()
                .filter_map(|p| std::fs::metadata(dir.join(format!("{id}{}", p.suffix()))).ok())
                .map(|m| m.len())
                .sum();
            found.push((mtime, id.to_string(), bytes));
        }
        found.sort();
        let total = found.iter().map(|f| f.2).sum();
        let index: VecDeque<(String, u64)> = found.into_iter().map(|(_, id, b)| (id, b)).collect();
        let store = Store {
            dir,
            max_bytes: cfg.max_bytes,
            quality: cfg.jpeg_quality,
            index: Mutex::new((index, total)),
            metrics,
        };
        store.evict();
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes one flagged frame, then deletes the oldest ones until the store fits its budget.
    pub fn put(&self, job: &StoreJob) -> Result<(), StoreError> {
        let id = &job.msg.frame_id;
        let mut bytes = 0;
        let json = serde_json::to_vec_pretty(&job.msg).unwrap_or_default();
        bytes += self.write_atomic(id, Part::Image, &self.jpeg(&job.image)?)?;
        bytes += self.write_atomic(id, Part::Overlay, &self.jpeg(&overlay::render(&job.image, &job.inspection))?)?;
        // The verdict goes last: its presence marks a complete entry.
        bytes += self.write_atomic(id, Part::Verdict, &json)?;
        {
            let mut g = sync::lock(&self.index);
            g.0.push_back((id.clone(), bytes));
            g.1 += bytes;
        }
        self.evict();
        Ok(())
    }

    fn jpeg(&self, img: &RgbImage) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, self.quality)
            .encode_image(img)
            .map_err(|e| StoreError::Io { path: self.dir.clone(), cause: std::io::Error::other(e) })?;
        Ok(out)
    }

    fn write_atomic(&self, id: &str, part: Part, data: &[u8]) -> Result<u64, StoreError> {
        let path = self.dir.join(format!("{id}{}", part.suffix()));
        let tmp = self.dir.join(format!(".{id}{}.tmp", part.suffix()));
        let io = |cause| StoreError::Io { path: path.clone(), cause };
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(data).map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(data.len() as u64)
    }

    fn evict(&self) {
        let mut g = sync::lock(&self.index);
        while g.1 > self.max_bytes {
            let Some((id, bytes)) = g.0.pop_front() else { break };
            for p in [Part::Verdict, Part::Image, Part::Overlay] {
                let _ = std::fs::remove_file(self.dir.join(format!("{id}{}", p.suffix())));
            }
            g.1 = g.1.saturating_sub(bytes);
            self.metrics.store_evicted();
            tracing::debug!("store: deleted {id} ({bytes} bytes) to stay under {} bytes", self.max_bytes);
        }
        self.metrics.store_size(g.1, g.0.len());
    }

    /// Ids of the most recent `n` stored frames, oldest first.
    pub fn recent(&self, n: usize) -> Vec<String> {
        let g = sync::lock(&self.index);
        g.0.iter().skip(g.0.len().saturating_sub(n)).map(|(id, _)| id.clone()).collect()
    }

    /// The stored verdicts among the newest `scan` frames, newest first (an unreadable one is skipped).
    pub fn newest_verdicts(&self, scan: usize) -> impl Iterator<Item = crate::types::verdict::VerdictMessage> + '_ {
        self.recent(scan).into_iter().rev().filter_map(move |id| {
            let bytes = self.get(&id, Part::Verdict)?;
            serde_json::from_slice(&bytes).ok()
        })
    }

    /// The bytes of one stored file; `None` for an unknown or invalid id (never a path outside the store).
    pub fn get(&self, id: &str, part: Part) -> Option<Vec<u8>> {
        if !valid_frame_id(id) {
            return None;
        }
        std::fs::read(self.dir.join(format!("{id}{}", part.suffix()))).ok()
    }

    /// Starts the writer thread; jobs beyond `capacity` waiting are refused (counted, logged).
    pub fn spawn_writer(
        self: &Arc<Self>,
        capacity: usize,
    ) -> std::io::Result<(crossbeam_channel::Sender<StoreJob>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::bounded::<StoreJob>(capacity);
        let store = self.clone();
        let handle = std::thread::Builder::new().name("store".into()).spawn(move || {
            for job in rx {
                if let Err(e) = store.put(&job) {
                    store.metrics.store_failure();
                    tracing::warn!(frame = %job.msg.frame_id, "{e}");
                }
            }
        })?;
        Ok((tx, handle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::map::Grid;
    use crate::source::intake::Intake;
    use crate::types::verdict::Outcome;

    fn job(id: &str) -> StoreJob {
        let t = Intake::new_test("c", 1, true, crate::config::daemon::Trigger::EveryFrame);
        let mut msg = t.intake.camera.skeleton(1, id.into(), None, SystemTime::now(), None);
        msg.verdict = Outcome::Ng;
        // Noise so that JPEG cannot shrink it to nothing.
        let mut rng = crate::util::rng::Rng::new(id.len() as u64);
        let image = RgbImage::from_fn(256, 256, |_, _| image::Rgb([rng.below(256) as u8, 0, 0]));
        let verdict = crate::detect::inspection::Verdict {
            anomalous: true,
            score: 1.0,
            threshold: 0.5,
            pixel_threshold: 0.5,
            regions: vec![],
            answer: String::new(),
            timings: Default::default(),
        };
        let inspection = Inspection { verdict, map: Grid::new(256, 256, vec![0.0; 256 * 256]) };
        StoreJob { msg, image, inspection }
    }

    #[test]
    fn keeps_frames_under_the_byte_budget_oldest_deleted_first_and_reindexes_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig { dir: dir.path().into(), max_bytes: 1 << 20, jpeg_quality: 90 };
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(&cfg, metrics.clone()).unwrap();
        for i in 0..30 {
            store.put(&job(&format!("c-0-{i}"))).unwrap();
        }
        let held = metrics.sample("anomalyd_store_bytes").unwrap_or(0.0) as u64;
        assert!(held <= cfg.max_bytes && held > 0, "{held}");
        assert!(metrics.sample("anomalyd_store_evicted_total").unwrap_or(0.0) > 0.0, "30 noisy frames exceed 1 MiB");
        assert!(store.get("c-0-0", Part::Image).is_none(), "the oldest went first");
        let newest = store.get("c-0-29", Part::Verdict).unwrap();
        let back: VerdictMessage = serde_json::from_slice(&newest).unwrap();
        assert_eq!(back.frame_id, "c-0-29");
        assert_eq!(&store.get("c-0-29", Part::Overlay).unwrap()[..2], &[0xFF, 0xD8]);
        assert!(store.get("../c-0-29", Part::Verdict).is_none());
        // A restart finds what is there and keeps honouring the budget.
        let frames = metrics.sample("anomalyd_store_frames").unwrap_or(0.0) as i64;
        let again = Store::open(&cfg, Arc::new(Metrics::new())).unwrap();
        assert_eq!(again.index.lock().unwrap().0.len() as i64, frames);
        assert!(
            std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp"))
        );
    }
}
