//! The audit log: every operator action (a login, a lesson applied, a rollback), who, when, what, and
//! the enrolment versions before and after. One JSON line per action, appended and fsynced before the
//! action is reported done, so that a power cut loses no record of a change that took effect. A torn
//! last line (a cut mid-write) is skipped when reading.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::types::verdict;
use crate::util::sync;

#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {cause}")]
pub struct AuditError {
    pub path: PathBuf,
    pub cause: std::io::Error,
}

/// One operator action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    pub time: String,
    pub unix_ms: u64,
    /// The operator's login name.
    pub user: String,
    /// `login`, `login_refused`, `logout`, `false_reject`, `zones`, `label`, `product`, `rollback`.
    pub action: String,
    /// What it acted on: a camera, `camera/recipe`, a frame id.
    pub target: String,
    pub detail: String,
    /// The camera's active enrolment version before and after (0 = the base enrolment).
    pub version_before: Option<u32>,
    pub version_after: Option<u32>,
}

impl AuditEntry {
    pub fn now(user: &str, action: &str, target: &str, detail: String) -> Self {
        let t = SystemTime::now();
        Self {
            time: verdict::rfc3339(t),
            unix_ms: verdict::unix_ms(t),
            user: user.into(),
            action: action.into(),
            target: target.into(),
            detail,
            version_before: None,
            version_after: None,
        }
    }
}

/// Most bytes read back from the end of the log to list recent entries.
const TAIL_BYTES: u64 = 1 << 20;

#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Opens (creating it and its folder) the log at `path`.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let err = |cause| AuditError { path: path.into(), cause };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut file = std::fs::OpenOptions::new().create(true).append(true).read(true).open(path).map_err(err)?;
        // A torn last line (a cut mid-write) is closed, so the next entry starts a line of its own.
        let len = file.metadata().map_err(err)?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).and_then(|_| file.read_exact(&mut last)).map_err(err)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").and_then(|_| file.sync_data()).map_err(err)?;
            }
        }
        Ok(Self { path: path.into(), file: Mutex::new(file) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and waits until it is on disk.
    pub fn record(&self, entry: &AuditEntry) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(entry).expect("an audit entry serialises");
        line.push(b'\n');
        let mut f = sync::lock(&self.file);
        f.write_all(&line).and_then(|_| f.sync_data()).map_err(|cause| AuditError { path: self.path.clone(), cause })
    }

    /// The newest `n` entries, newest first (from the log's last MiB).
    pub fn recent(&self, n: usize) -> Result<Vec<AuditEntry>, AuditError> {
        let err = |cause| AuditError { path: self.path.clone(), cause };
        let mut f = std::fs::File::open(&self.path).map_err(err)?;
        let len = f.metadata().map_err(err)?.len();
        let start = len.saturating_sub(TAIL_BYTES);
        f.seek(SeekFrom::Start(start)).map_err(err)?;
        let mut text = String::new();
        f.take(TAIL_BYTES).read_to_string(&mut text).map_err(err)?;
        // From the middle of the file, the first line may be cut: parsing skips it like a torn one.
        let mut out: Vec<AuditEntry> =
            text.lines().rev().filter_map(|l| serde_json::from_str(l).ok()).take(n).collect();
        out.truncate(n);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_reopen_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let mut a = AuditEntry::now("anna", "false_reject", "cam1", "frame x".into());
        a.version_before = Some(0);
        a.version_after = Some(1);
        log.record(&a).unwrap();
        log.record(&AuditEntry::now("anna", "rollback", "cam1", String::new())).unwrap();
        drop(log);
        // A cut in the middle of a third write.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"time\":\"20").unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.record(&AuditEntry::now("ben", "login", "", String::new())).unwrap();
        let got = log.recent(10).unwrap();
        assert_eq!(got.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["login", "rollback", "false_reject"]);
        assert_eq!(got[2], a);
        assert_eq!(log.recent(1).unwrap().len(), 1);
    }
}
