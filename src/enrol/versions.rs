//! A camera's enrolment versions: what line mode learned, kept with its history so that it survives a
//! restart and can be rolled back.
//!
//! One folder per camera (`<daemon.enrolments>/<camera>/`):
//! ```text
//! base          the id of the enrolment the versions grew from (its reference, enrolled)
//! v0001.anomalyd, v0002.anomalyd, ...   learned versions, never rewritten
//! active        the version in use: a number, or 0 for the base enrolment itself
//! history.jsonl one line per change (learned, taught by an operator, rolled back), oldest first
//! ```
//! When the camera's reference changes, its base id changes and the old versions no longer apply: the
//! folder is started afresh (the old one is renamed aside, not deleted).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detect::enrolment::Enrolment;
use crate::enrol::file::{self, EnrolmentError};

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("enrolment versions in {dir}: {cause}")]
    Io { dir: PathBuf, cause: std::io::Error },
    #[error(transparent)]
    File(#[from] EnrolmentError),
    #[error("camera {camera} has no enrolment version {version} (it has {have:?}; 0 is the base enrolment)")]
    NoSuchVersion { camera: String, version: u32, have: Vec<u32> },
    #[error("camera {camera} has nothing to roll back to: the base enrolment is active")]
    AtBase { camera: String },
}

/// One line of a camera's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    pub unix: u64,
    /// `learned`, `taught` or `rollback`.
    pub action: String,
    /// The version active after the change (0 = base).
    pub version: u32,
    /// Its image threshold (unknown here for the base enrolment).
    pub image_threshold: Option<f32>,
    pub note: String,
}

/// A camera's version folder.
#[derive(Debug, Clone)]
pub struct Versions {
    dir: PathBuf,
    camera: String,
}

impl Versions {
    /// The versions of `camera` under `root`, for the base enrolment `base_id`. A folder made for
    /// another base is renamed aside (`<camera>.<unix>.old`) and a new one started.
    pub fn open(root: &Path, camera: &str, base_id: &str) -> Result<Self, VersionError> {
        let dir = root.join(camera);
        let v = Self { dir: dir.clone(), camera: camera.into() };
        let io = |cause| VersionError::Io { dir: dir.clone(), cause };
        match std::fs::read_to_string(dir.join("base")) {
            Ok(b) if b.trim() == base_id => return Ok(v),
            Ok(other) => {
                let aside = root.join(format!("{camera}.{}.old", now()));
                tracing::warn!(
                    camera,
                    "the reference changed (base {} -> {base_id}): learned versions moved to {}",
                    other.trim(),
                    aside.display()
                );
                std::fs::rename(&dir, &aside).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        std::fs::create_dir_all(&dir).map_err(io)?;
        write_atomic(&dir.join("base"), base_id.as_bytes()).map_err(io)?;
        Ok(v)
    }

    fn io(&self, cause: std::io::Error) -> VersionError {
        VersionError::Io { dir: self.dir.clone(), cause }
    }

    /// The versions of `camera` as they are, without checking their base (for listing and rolling
    /// back offline); an error if the camera has none.
    pub fn existing(root: &Path, camera: &str) -> Result<Self, VersionError> {
        let dir = root.join(camera);
        if !dir.join("base").is_file() {
            return Err(VersionError::Io {
                dir,
                cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no learned versions for this camera"),
            });
        }
        Ok(Self { dir, camera: camera.into() })
    }

    /// Version numbers stored, ascending.
    pub fn list(&self) -> Result<Vec<u32>, VersionError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(|e| self.io(e))? {
            let name = e.map_err(|e| self.io(e))?.file_name().to_string_lossy().into_owned();
            if let Some(n) =
                name.strip_prefix('v').and_then(|s| s.strip_suffix(".anomalyd")).and_then(|s| s.parse().ok())
            {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The active version: None when learning has never finished for this base.
    pub fn active(&self) -> Result<Option<u32>, VersionError> {
        match std::fs::read_to_string(self.dir.join("active")) {
            Ok(s) => Ok(s.trim().parse().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    /// The enrolment of version `n` (not 0).
    pub fn load(&self, n: u32) -> Result<Enrolment, VersionError> {
        Ok(file::load(&self.path(n))?)
    }

    fn path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("v{n:04}.anomalyd"))
    }

    /// Stores a learned enrolment as the next version and makes it active.
    pub fn add(&self, e: &Enrolment, note: &str) -> Result<u32, VersionError> {
        self.add_as(e, "learned", note)
    }

    /// Stores an enrolment as the next version and makes it active, recording `action` (`learned`,
    /// `taught`) in the history.
    pub fn add_as(&self, e: &Enrolment, action: &str, note: &str) -> Result<u32, VersionError> {
        let n = self.list()?.last().copied().unwrap_or(0) + 1;
        file::save(e, &self.path(n))?;
        self.set_active(n, action, Some(e.meta.thresholds.image), note)?;
        Ok(n)
    }

    /// Makes version `to` active (0 = the base enrolment), or without `to` the one before the active
    /// version. Returns the version now active.
    pub fn rollback(&self, to: Option<u32>) -> Result<u32, VersionError> {
        let have = self.list()?;
        let active = self.active()?.unwrap_or(0);
        let to = match to {
            Some(t) => t,
            None if active == 0 => return Err(VersionError::AtBase { camera: self.camera.clone() }),
            None => have.iter().copied().filter(|&v| v < active).max().unwrap_or(0),
        };
        if to != 0 && !have.contains(&to) {
            return Err(VersionError::NoSuchVersion { camera: self.camera.clone(), version: to, have });
        }
        let threshold = if to == 0 { None } else { Some(self.load(to)?.meta.thresholds.image) };
        self.set_active(to, "rollback", threshold, &format!("from version {active}"))?;
        Ok(to)
    }

    fn set_active(&self, n: u32, action: &str, image_threshold: Option<f32>, note: &str) -> Result<(), VersionError> {
        write_atomic(&self.dir.join("active"), n.to_string().as_bytes()).map_err(|e| self.io(e))?;
        let change = Change { unix: now(), action: action.into(), version: n, image_threshold, note: note.into() };
        let mut line = serde_json::to_vec(&change).expect("a change serialises");
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("history.jsonl"))
            .map_err(|e| self.io(e))?;
        f.write_all(&line).and_then(|_| f.sync_all()).map_err(|e| self.io(e))
    }

    /// Every change, oldest first (a torn last line is left out).
    pub fn history(&self) -> Result<Vec<Change>, VersionError> {
        match std::fs::read_to_string(self.dir.join("history.jsonl")) {
            Ok(s) => Ok(s.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.io(e)),
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_added_listed_and_rolled_back() {
        let root = tempfile::tempdir().unwrap();
        let v = Versions::open(root.path(), "cam", "base1").unwrap();
        assert_eq!(v.active().unwrap(), None);
        let mut e = file::sample_for_tests();
        e.meta.thresholds.image = 1.5;
        assert_eq!(v.add(&e, "first").unwrap(), 1);
        e.meta.thresholds.image = 1.25;
        assert_eq!(v.add(&e, "second").unwrap(), 2);
        assert_eq!(v.list().unwrap(), [1, 2]);
        assert_eq!(v.active().unwrap(), Some(2));
        assert_eq!(v.load(2).unwrap().meta.thresholds.image, 1.25);
        // Back one step, then to the base, then nothing further back.
        assert_eq!(v.rollback(None).unwrap(), 1);
        assert_eq!(v.rollback(Some(0)).unwrap(), 0);
        assert!(matches!(v.rollback(None), Err(VersionError::AtBase { .. })));
        assert!(matches!(v.rollback(Some(7)), Err(VersionError::NoSuchVersion { .. })));
        let h = v.history().unwrap();
        assert_eq!(
            h.iter().map(|c| (c.action.as_str(), c.version)).collect::<Vec<_>>(),
            [("learned", 1), ("learned", 2), ("rollback", 1), ("rollback", 0)]
        );
        assert_eq!((h[1].image_threshold, h[3].image_threshold), (Some(1.25), None));
        assert!(Versions::existing(root.path(), "cam").is_ok() && Versions::existing(root.path(), "other").is_err());
        // Reopened for the same base, everything is still there; for a new base, it starts afresh.
        assert_eq!(Versions::open(root.path(), "cam", "base1").unwrap().active().unwrap(), Some(0));
        let fresh = Versions::open(root.path(), "cam", "base2").unwrap();
        assert_eq!(fresh.active().unwrap(), None);
        assert!(fresh.list().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 2, "the old folder is kept aside");
    }
}
