//! The outbox: every verdict is written to a durable on-disk log (redb) before it is published, and
//! leaves the log only when the broker has acknowledged it. After a broker outage or a restart the
//! backlog is published again, in order, marked `"replayed": true`.
//!
//! - **Bounded.** The log is bounded by bytes. Past the bound, verdicts are evicted in this order:
//!   ERROR and SKIPPED first, then OK, then NG, the oldest first within each; a new verdict never
//!   evicts one of a higher class (a flood of ERROR verdicts can only evict older ERROR verdicts, and
//!   is itself dropped once none are left). Every eviction is counted and logged.
//! - **Dead letters.** A verdict the broker will not take (over its packet limit, or dropping the
//!   connection on it again and again) moves to a second table, kept, counted and served over HTTP,
//!   so the link moves on instead of looping on it.
//! - **Disk faults.** After a failed write redb refuses every later call, so the outbox closes the
//!   database, says it is not writable (readiness, `anomalyd_outbox_writable`) and reopens it with
//!   backoff until the disk takes writes again; the link keeps verdicts in a bounded memory queue
//!   meanwhile. A file that is not a readable redb database at start is moved aside
//!   (`<file>.corrupt-<unix time>`) and a fresh one opened, loudly.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, StorageError,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::telemetry::Metrics;
use crate::types::verdict::{self, Outcome, VerdictMessage};
use crate::util::sync;

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("verdicts");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// Dead letters kept; beyond this the oldest are dropped (counted).
pub const MAX_DEAD_LETTERS: usize = 1000;
/// Longest wait between two attempts to reopen a failed outbox.
const MAX_REOPEN_BACKOFF: Duration = Duration::from_secs(8);

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "outbox {path}: {reason} (is another anomalyd using the same state directory? set outbox.path to a \
         file of this daemon's own)"
    )]
    Locked { path: PathBuf, reason: String },
    #[error("outbox {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("outbox {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("outbox {path} is not writable since a disk failure; retrying")]
    Down { path: PathBuf },
}

/// A stored verdict: its key (publication order) and its JSON.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: u64,
    pub json: Vec<u8>,
}

/// A verdict the broker would not take, with why and when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    pub at: String,
    pub reason: String,
    pub verdict: serde_json::Value,
}

/// The dead letters as the HTTP API serves them (newest last); the outbox keeps it current.
#[derive(Debug, Clone, Default)]
pub struct DeadLetters(Arc<Mutex<VecDeque<DeadLetter>>>);

impl DeadLetters {
    pub fn list(&self) -> Vec<DeadLetter> {
        sync::lock(&self.0).iter().cloned().collect()
    }

    fn push(&self, d: DeadLetter) {
        let mut q = sync::lock(&self.0);
        q.push_back(d);
        while q.len() > MAX_DEAD_LETTERS {
            q.pop_front();
        }
    }
}

/// Eviction class: lower goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Unjudged = 0,
    Ok = 1,
    Ng = 2,
}

impl Class {
    pub fn of(o: Outcome) -> Class {
        match o {
            Outcome::Ok => Class::Ok,
            Outcome::Ng => Class::Ng,
            Outcome::Skipped | Outcome::Error => Class::Unjudged,
        }
    }

    fn of_json(json: &[u8]) -> Class {
        #[derive(Deserialize)]
        struct Only {
            verdict: Outcome,
        }
        serde_json::from_slice::<Only>(json).map_or(Class::Unjudged, |o| Class::of(o.verdict))
    }
}

/// Opens the database file (a test swaps in a backend that fails on demand).
type Opener = Box<dyn Fn(&Path) -> Result<Database, DatabaseError> + Send>;

pub struct Outbox {
    /// `None` after a disk failure, until a reopen succeeds.
    db: Option<Database>,
    opener: Opener,
    path: PathBuf,
    max_bytes: u64,
    bytes: u64,
    /// Size of each stored verdict.
    sizes: HashMap<u64, u64>,
    /// Stored keys by eviction class.
    classes: [BTreeSet<u64>; 3],
    next_key: u64,
    next_dead: u64,
    /// Keys below this were written by an earlier run of the daemon.
    first_key_this_run: u64,
    metrics: Arc<Metrics>,
    dead: DeadLetters,
    /// Keys acknowledged while the database was closed: removed once it is back.
    unremoved: Vec<u64>,
    /// When the next reopen is due, and the wait after that.
    retry: Option<(Instant, Duration)>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("path", &self.path).field("len", &self.len()).finish()
    }
}

/// The errors redb gives for a file that is not a database it can read; anything else (a lock, a
/// permission, a missing directory) is reported, never moved aside.
fn unreadable(e: &DatabaseError) -> bool {
    match e {
        DatabaseError::RepairAborted | DatabaseError::UpgradeRequired(_) => true,
        DatabaseError::Storage(StorageError::Corrupted(_)) => true,
        DatabaseError::Storage(StorageError::Io(io)) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

impl Outbox {
    /// Opens (creating) the log and counts what an earlier run left in it. A file redb cannot read is
    /// moved aside and a fresh log started (an error line and `anomalyd_outbox_corrupt_total` say so).
    pub fn open(path: &Path, max_bytes: u64, metrics: Arc<Metrics>) -> Result<Outbox, OutboxError> {
        Self::open_with(path, max_bytes, metrics, Box::new(|p| Database::create(p)))
    }

    fn open_with(path: &Path, max_bytes: u64, metrics: Arc<Metrics>, opener: Opener) -> Result<Outbox, OutboxError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| OutboxError::Open { path: path.into(), reason: e.to_string() })?;
        }
        let db = match Self::try_open(&opener, path) {
            Ok(db) => db,
            Err(e) if e.is_unreadable() => {
                let aside = moved_aside(path)?;
                metrics.outbox_corrupt();
                tracing::error!(
                    "outbox {} is not a database anomalyd can read ({e}); moved it to {} and started a fresh \
                     one: verdicts an earlier run left unpublished are in that file, not republished",
                    path.display(),
                    aside.display()
                );
                Self::try_open(&opener, path).map_err(|e| e.into_error(path))?
            }
            Err(e) => return Err(e.into_error(path)),
        };
        let mut outbox = Outbox {
            db: Some(db),
            opener,
            path: path.into(),
            max_bytes,
            bytes: 0,
            sizes: HashMap::new(),
            classes: Default::default(),
            next_key: 1,
            next_dead: 1,
            first_key_this_run: 1,
            metrics,
            dead: DeadLetters::default(),
            unremoved: Vec::new(),
            retry: None,
        };
        outbox.load().map_err(|e| outbox.io(e))?;
        outbox.first_key_this_run = outbox.next_key;
        outbox.metrics.outbox_writable(true);
        if !outbox.is_empty() {
            tracing::info!(
                "outbox {}: {} verdict(s) from an earlier run will be published again",
                path.display(),
                outbox.len()
            );
        }
        Ok(outbox)
    }

    /// Opens the database; a panic in the storage layer (debug builds assert on some corruptions) is
    /// taken as an unreadable file.
    fn try_open(opener: &Opener, path: &Path) -> Result<Database, OpenFailure> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| opener(path))) {
            Ok(Ok(db)) => Ok(db),
            Ok(Err(e)) => Err(OpenFailure::Db(e)),
            Err(_) => Err(OpenFailure::Panicked),
        }
    }

    /// Reads what the file holds: the verdicts' sizes and classes, the next keys and the dead letters.
    fn load(&mut self) -> Result<(), redb::Error> {
        let db = self.db.as_ref().expect("load runs on an open database");
        let tx = db.begin_write()?;
        tx.open_table(TABLE)?;
        tx.open_table(DEAD)?;
        tx.commit()?;
        let rtx = db.begin_read()?;
        let table = rtx.open_table(TABLE)?;
        let (mut sizes, mut classes, mut bytes, mut last) = (HashMap::new(), <[BTreeSet<u64>; 3]>::default(), 0, 0);
        for item in table.iter()? {
            let (k, v) = item?;
            let (k, n) = (k.value(), v.value().len() as u64);
            sizes.insert(k, n);
            classes[Class::of_json(v.value()) as usize].insert(k);
            bytes += n;
            last = k;
        }
        let dead = rtx.open_table(DEAD)?;
        let mut letters = VecDeque::new();
        let mut last_dead = 0;
        for item in dead.iter()? {
            let (k, v) = item?;
            last_dead = k.value();
            if let Ok(d) = serde_json::from_slice::<DeadLetter>(v.value()) {
                letters.push_back(d);
            }
        }
        self.sizes = sizes;
        self.classes = classes;
        self.bytes = bytes;
        self.next_key = self.next_key.max(last + 1);
        self.next_dead = last_dead + 1;
        *sync::lock(&self.dead.0) = letters;
        self.metrics.dead_letters(sync::lock(&self.dead.0).len());
        self.gauges();
        Ok(())
    }

    fn io(&self, e: impl std::fmt::Display) -> OutboxError {
        OutboxError::Io { path: self.path.clone(), reason: e.to_string() }
    }

    /// A write failed: close the database (redb refuses every later call after an I/O error), say so
    /// and schedule a reopen.
    fn failed(&mut self, e: impl std::fmt::Display) -> OutboxError {
        let err = self.io(e);
        if self.db.take().is_some() {
            self.metrics.outbox_writable(false);
            tracing::error!(
                "{err}; the outbox is closed and verdicts wait in memory (bounded) until it reopens: free disk \
                 space under {}",
                self.path.display()
            );
        }
        self.metrics.outbox_failure();
        self.retry_later();
        err
    }

    /// Schedules the next reopen: 250 ms after the first failure, then twice as long each time, at most
    /// [`MAX_REOPEN_BACKOFF`].
    fn retry_later(&mut self) {
        let wait = self.retry.map_or(Duration::from_millis(250), |(_, w)| (w * 2).min(MAX_REOPEN_BACKOFF));
        self.retry = Some((Instant::now() + wait, wait));
    }

    fn down(&self) -> OutboxError {
        OutboxError::Down { path: self.path.clone() }
    }

    /// False since a disk failure, until a reopen succeeds.
    pub fn writable(&self) -> bool {
        self.db.is_some()
    }

    /// When the next reopen attempt is due (None while writable).
    pub fn reopen_due(&self) -> Option<Instant> {
        self.retry.filter(|_| self.db.is_none()).map(|(at, _)| at)
    }

    /// Tries to reopen a failed outbox (when due); true once it is writable again. What the file holds
    /// is read again, and acknowledgements that arrived meanwhile are applied.
    pub fn reopen(&mut self) -> bool {
        if self.db.is_some() {
            return true;
        }
        if self.reopen_due().is_some_and(|at| Instant::now() < at) {
            return false;
        }
        let db = match Self::try_open(&self.opener, &self.path) {
            Ok(db) => db,
            Err(e) => {
                self.retry_later();
                tracing::debug!("outbox {} still cannot be opened: {}", self.path.display(), e.describe());
                return false;
            }
        };
        self.db = Some(db);
        if let Err(e) = self.load() {
            self.failed(e);
            return false;
        }
        // Prove that it takes writes before calling it writable: a reopen on a still-full disk
        // succeeds, and only the next write fails.
        if let Err(e) = self.sync() {
            tracing::debug!("{e}");
            return false;
        }
        let acked = std::mem::take(&mut self.unremoved);
        if let Err(e) = self.remove(&acked) {
            tracing::debug!("{e}");
            return false;
        }
        self.retry = None;
        self.metrics.outbox_writable(true);
        tracing::info!("outbox {} is writable again", self.path.display());
        true
    }

    fn gauges(&self) {
        self.metrics.outbox_size(self.bytes, self.len());
    }

    pub fn len(&self) -> u64 {
        self.sizes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    /// The dead letters, shared with the HTTP API.
    pub fn dead_letters(&self) -> DeadLetters {
        self.dead.clone()
    }

    /// True for a key written by an earlier run (published again after a restart).
    pub fn from_earlier_run(&self, key: u64) -> bool {
        key < self.first_key_this_run
    }

    /// What to evict so that verdicts of these (class, size) fit under the byte bound; and which of
    /// the new ones do not fit at all (nothing they may evict is left).
    fn plan(&self, incoming: &[(Class, u64)]) -> (Vec<u64>, Vec<bool>) {
        let mut victims = Vec::new();
        let mut fits = Vec::with_capacity(incoming.len());
        let mut iters = self.classes.each_ref().map(|s| s.iter().peekable());
        let mut bytes = self.bytes;
        for &(class, n) in incoming {
            while bytes + n > self.max_bytes {
                let Some(k) = iters[..=class as usize].iter_mut().find_map(|it| it.next()) else { break };
                bytes -= self.sizes[k];
                victims.push(*k);
            }
            let fit = bytes + n <= self.max_bytes;
            if fit {
                bytes += n;
            }
            fits.push(fit);
        }
        (victims, fits)
    }

    /// Appends verdicts in one durable transaction; returns their keys (`None` for one that did not
    /// fit under the bound). Evicts stored verdicts first, in the order the module doc gives (a metric
    /// and a log line say how many).
    pub fn append(&mut self, msgs: &[VerdictMessage]) -> Result<Vec<Option<u64>>, OutboxError> {
        let encoded: Vec<(Class, Vec<u8>)> =
            msgs.iter().map(|m| (Class::of(m.verdict), serde_json::to_vec(m).unwrap_or_default())).collect();
        let (victims, fits) = self.plan(&encoded.iter().map(|(c, e)| (*c, e.len() as u64)).collect::<Vec<_>>());
        let db = self.db.as_ref().ok_or_else(|| self.down())?;
        let first = self.next_key;
        let written = (|| -> Result<(), redb::Error> {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            {
                let mut table = tx.open_table(TABLE)?;
                for k in &victims {
                    table.remove(k)?;
                }
                let mut key = first;
                for ((_, e), fit) in encoded.iter().zip(&fits) {
                    if *fit {
                        table.insert(key, e.as_slice())?;
                        key += 1;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = written {
            return Err(self.failed(e));
        }
        let mut evicted_bytes = 0;
        for k in &victims {
            evicted_bytes += self.forget(*k);
        }
        let mut keys = Vec::with_capacity(msgs.len());
        for ((class, e), fit) in encoded.iter().zip(&fits) {
            if *fit {
                self.sizes.insert(self.next_key, e.len() as u64);
                self.classes[*class as usize].insert(self.next_key);
                self.bytes += e.len() as u64;
                keys.push(Some(self.next_key));
                self.next_key += 1;
            } else {
                keys.push(None);
            }
        }
        let dropped = fits.iter().filter(|f| !**f).count() as u64;
        if !victims.is_empty() || dropped > 0 {
            self.metrics.outbox_evicted(victims.len() as u64 + dropped);
            tracing::warn!(
                "outbox over its bound of {} bytes: evicted {} unpublished verdict(s) ({evicted_bytes} bytes; ERROR \
                 and SKIPPED first, then OK, then NG) and dropped {dropped} new one(s) with nothing they may evict",
                self.max_bytes,
                victims.len()
            );
        }
        self.gauges();
        Ok(keys)
    }

    /// Drops a key from the bookkeeping; returns its size.
    fn forget(&mut self, k: u64) -> u64 {
        let n = self.sizes.remove(&k).unwrap_or(0);
        for c in &mut self.classes {
            c.remove(&k);
        }
        self.bytes -= n.min(self.bytes);
        n
    }

    /// Removes acknowledged verdicts. The removal is made durable by the next append (or at close):
    /// a crash in between can only publish an acknowledged verdict twice, never lose one. While the
    /// database is closed, the keys wait for the reopen.
    pub fn remove(&mut self, keys: &[u64]) -> Result<(), OutboxError> {
        if keys.is_empty() {
            return Ok(());
        }
        let Some(db) = self.db.as_ref() else {
            self.unremoved.extend_from_slice(keys);
            return Ok(());
        };
        let removed = (|| -> Result<(), redb::Error> {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::None)?;
            {
                let mut table = tx.open_table(TABLE)?;
                for k in keys {
                    table.remove(k)?;
                }
            }
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = removed {
            self.unremoved.extend_from_slice(keys);
            return Err(self.failed(e));
        }
        for k in keys {
            self.forget(*k);
        }
        self.gauges();
        Ok(())
    }

    /// Moves a verdict the broker will not take to the dead letters (`key`: its outbox key, if it has
    /// one; a verdict held in memory has none). Kept in memory when the database is closed.
    pub fn dead_letter(&mut self, key: Option<u64>, json: &[u8], reason: &str) {
        let letter = DeadLetter {
            at: verdict::rfc3339(SystemTime::now()),
            reason: reason.to_string(),
            verdict: serde_json::from_slice(json).unwrap_or(serde_json::Value::Null),
        };
        let encoded = serde_json::to_vec(&letter).unwrap_or_default();
        let dead_key = self.next_dead;
        let moved = self.db.as_ref().map(|db| {
            (|| -> Result<(), redb::Error> {
                let mut tx = db.begin_write()?;
                tx.set_durability(Durability::Immediate)?;
                {
                    let mut dead = tx.open_table(DEAD)?;
                    dead.insert(dead_key, encoded.as_slice())?;
                    while dead.len()? > MAX_DEAD_LETTERS as u64 {
                        dead.pop_first()?;
                    }
                    if let Some(k) = key {
                        tx.open_table(TABLE)?.remove(k)?;
                    }
                }
                tx.commit()?;
                Ok(())
            })()
        });
        match moved {
            Some(Ok(())) => {
                self.next_dead += 1;
                if let Some(k) = key {
                    self.forget(k);
                }
            }
            Some(Err(e)) => {
                self.failed(e);
                if let Some(k) = key {
                    // Out of the publication order now; the file still holds it until the reopen.
                    self.forget(k);
                    self.unremoved.push(k);
                }
            }
            None => {
                if let Some(k) = key {
                    self.forget(k);
                    self.unremoved.push(k);
                }
            }
        }
        self.metrics.dead_lettered();
        tracing::error!(
            "verdict {} dead-lettered: {reason}; kept under GET /v1/dead-letters, the link moves on",
            letter.verdict.get("frame_id").and_then(|f| f.as_str()).unwrap_or("?")
        );
        self.dead.push(letter);
        self.metrics.dead_letters(sync::lock(&self.dead.0).len());
        self.gauges();
    }

    /// Up to `limit` stored verdicts with keys from `from`, in order (none while the database is closed).
    pub fn from_key(&mut self, from: u64, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        let Some(db) = self.db.as_ref() else { return Ok(Vec::new()) };
        let read = (|| -> Result<Vec<Entry>, redb::Error> {
            let rtx = db.begin_read()?;
            let table = rtx.open_table(TABLE)?;
            let mut out = Vec::new();
            for item in table.range(from..)?.take(limit) {
                let (k, v) = item?;
                out.push(Entry { key: k.value(), json: v.value().to_vec() });
            }
            Ok(out)
        })();
        read.map_err(|e| self.failed(e))
    }

    /// Makes every earlier commit durable (at shutdown).
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        let db = self.db.as_ref().ok_or_else(|| self.down())?;
        let synced = (|| -> Result<(), redb::Error> {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            tx.commit()?;
            Ok(())
        })();
        synced.map_err(|e| self.failed(e))
    }

    /// The oldest stored key, if any.
    pub fn first_key(&self) -> Option<u64> {
        self.classes.iter().filter_map(|c| c.first()).min().copied()
    }
}

/// Why opening failed.
enum OpenFailure {
    Db(DatabaseError),
    Panicked,
}

impl OpenFailure {
    fn is_unreadable(&self) -> bool {
        match self {
            OpenFailure::Db(e) => unreadable(e),
            OpenFailure::Panicked => true,
        }
    }

    fn describe(&self) -> String {
        match self {
            OpenFailure::Db(e) => e.to_string(),
            OpenFailure::Panicked => "the storage layer failed on it".into(),
        }
    }

    fn into_error(self, path: &Path) -> OutboxError {
        match self {
            OpenFailure::Db(e @ (DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch)) => {
                OutboxError::Locked { path: path.into(), reason: e.to_string() }
            }
            other => OutboxError::Open { path: path.into(), reason: other.describe() },
        }
    }
}

impl std::fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Renames an unreadable outbox to `<file>.corrupt-<unix seconds>`; returns the new name.
fn moved_aside(path: &Path) -> Result<PathBuf, OutboxError> {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{secs}"));
    let aside = path.with_file_name(name);
    std::fs::rename(path, &aside).map_err(|e| OutboxError::Open {
        path: path.into(),
        reason: format!("unreadable, and it could not be moved aside to {}: {e}", aside.display()),
    })?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::backends::FileBackend;
    use redb::{BackendError, StorageBackend};

    use super::*;
    use crate::source::intake::Intake;

    fn msg(seq: u64) -> VerdictMessage {
        let t = Intake::new_test("c", 1, true, crate::config::daemon::Trigger::EveryFrame);
        t.intake.camera.skeleton(seq, format!("c-0-{seq}"), None, std::time::SystemTime::now(), None)
    }

    fn judged(seq: u64, verdict: Outcome) -> VerdictMessage {
        VerdictMessage { verdict, ..msg(seq) }
    }

    fn keys(o: &mut Outbox) -> Vec<u64> {
        o.from_key(0, 1000).unwrap().iter().map(|e| e.key).collect()
    }

    #[test]
    fn survives_reopening_in_order_and_forgets_acknowledged_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/outbox.redb");
        let m = Arc::new(Metrics::new());
        {
            let mut o = Outbox::open(&path, 1 << 20, m.clone()).unwrap();
            let keys = o.append(&[msg(1), msg(2), msg(3)]).unwrap();
            assert_eq!(keys, [Some(1), Some(2), Some(3)]);
            o.remove(&[1]).unwrap();
            assert_eq!(o.len(), 2);
        }
        let mut o = Outbox::open(&path, 1 << 20, m).unwrap();
        assert!(o.from_earlier_run(3));
        assert_eq!(keys(&mut o), [2, 3]);
        let back: VerdictMessage = serde_json::from_slice(&o.from_key(3, 1).unwrap()[0].json).unwrap();
        assert_eq!(back.frame_id, "c-0-3");
        assert_eq!(o.append(&[msg(4)]).unwrap(), [Some(4)], "keys continue after a restart");
        assert!(!o.from_earlier_run(4));
    }

    #[test]
    fn evicts_errors_then_ok_then_ng_and_an_error_flood_never_evicts_a_judged_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let one = serde_json::to_vec(&judged(1, Outcome::Ng)).unwrap().len() as u64;
        let mut o = Outbox::open(&dir.path().join("o.redb"), one * 5 + one / 2, m.clone()).unwrap();
        // 1 NG, 2 OK, 3 ERROR, 4 OK, 5 NG: full.
        for (s, v) in [(1, Outcome::Ng), (2, Outcome::Ok), (3, Outcome::Error), (4, Outcome::Ok), (5, Outcome::Ng)] {
            o.append(&[judged(s, v)]).unwrap();
        }
        o.append(&[judged(6, Outcome::Ok)]).unwrap();
        assert_eq!(keys(&mut o), [1, 2, 4, 5, 6], "the ERROR verdict goes first");
        o.append(&[judged(7, Outcome::Ng)]).unwrap();
        assert_eq!(keys(&mut o), [1, 4, 5, 6, 7], "then the oldest OK");
        let flood: Vec<VerdictMessage> = (8..40).map(|s| judged(s, Outcome::Error)).collect();
        assert_eq!(o.append(&flood).unwrap(), vec![None; flood.len()], "ERROR verdicts have nothing to evict");
        assert_eq!(keys(&mut o), [1, 4, 5, 6, 7], "no OK or NG verdict was evicted by the flood");
        o.append(&[judged(40, Outcome::Ng), judged(41, Outcome::Ng)]).unwrap();
        assert_eq!(keys(&mut o), [1, 5, 7, 8, 9], "NG evicts OK before NG, keys continue");
        assert_eq!(m.sample("anomalyd_outbox_evicted_total"), Some(2.0 + 32.0 + 2.0));
    }

    #[test]
    fn a_second_daemon_on_the_same_outbox_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.redb");
        let _first = Outbox::open(&path, 1 << 20, Arc::new(Metrics::new())).unwrap();
        let e = Outbox::open(&path, 1 << 20, Arc::new(Metrics::new())).unwrap_err().to_string();
        assert!(e.contains("another anomalyd"), "{e}");
    }

    #[test]
    fn a_corrupt_outbox_is_moved_aside_and_a_fresh_one_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        std::fs::write(&path, vec![0xA5; 40_000]).unwrap();
        let m = Arc::new(Metrics::new());
        let mut o = Outbox::open(&path, 1 << 20, m.clone()).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.append(&[msg(1)]).unwrap(), [Some(1)]);
        assert_eq!(m.sample("anomalyd_outbox_corrupt_total"), Some(1.0));
        let aside: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("outbox.redb.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "the unreadable file is kept for a person to look at");
        assert_eq!(std::fs::read(dir.path().join(&aside[0])).unwrap(), vec![0xA5; 40_000]);
    }

    #[test]
    fn dead_letters_leave_the_publication_order_and_are_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.redb");
        let m = Arc::new(Metrics::new());
        {
            let mut o = Outbox::open(&path, 1 << 20, m.clone()).unwrap();
            o.append(&[msg(1), msg(2), msg(3)]).unwrap();
            let json = o.from_key(2, 1).unwrap()[0].json.clone();
            o.dead_letter(Some(2), &json, "over the broker's packet limit");
            assert_eq!(keys(&mut o), [1, 3]);
            assert_eq!(m.sample("anomalyd_dead_letters"), Some(1.0));
        }
        let o = Outbox::open(&path, 1 << 20, Arc::new(Metrics::new())).unwrap();
        let d = o.dead_letters().list();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].reason, "over the broker's packet limit");
        assert_eq!(d[0].verdict["frame_id"], "c-0-2");
    }

    /// A file backend whose writes fail with "no space left on device" while `full` is set.
    #[derive(Debug)]
    struct Disk {
        file: FileBackend,
        full: Arc<AtomicBool>,
    }

    impl Disk {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.full.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            Ok(())
        }
    }

    impl StorageBackend for Disk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.file.write(offset, data)
        }
        fn close(&self) -> Result<(), std::io::Error> {
            self.file.close()
        }
        fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.file.try_lock_range(s, e)
        }
        fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.file.try_lock_shared_range(s, e)
        }
        fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.file.lock_range(s, e)
        }
        fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.file.lock_shared_range(s, e)
        }
        fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.file.unlock_range(s, e)
        }
        fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.file.query_lock_range(s, e)
        }
    }

    #[test]
    fn after_a_full_disk_the_outbox_says_so_and_reopens_by_itself_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.redb");
        let full = Arc::new(AtomicBool::new(false));
        let flag = full.clone();
        let opener: Opener = Box::new(move |p| {
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(p)?;
            redb::Builder::new().create_with_backend(Disk { file: FileBackend::new(file)?, full: flag.clone() })
        });
        let m = Arc::new(Metrics::new());
        let mut o = Outbox::open_with(&path, 1 << 20, m.clone(), opener).unwrap();
        o.append(&[msg(1), msg(2)]).unwrap();
        full.store(true, Ordering::SeqCst);
        assert!(o.append(&[msg(3)]).is_err());
        assert!(!o.writable());
        assert_eq!(m.sample("anomalyd_outbox_writable"), Some(0.0));
        assert!(matches!(o.append(&[msg(3)]), Err(OutboxError::Down { .. })), "closed, not retried on every verdict");
        o.remove(&[1]).unwrap();
        std::thread::sleep(o.reopen_due().unwrap().saturating_duration_since(Instant::now()));
        assert!(!o.reopen(), "still full");
        full.store(false, Ordering::SeqCst);
        std::thread::sleep(o.reopen_due().unwrap().saturating_duration_since(Instant::now()));
        assert!(o.reopen());
        assert_eq!(m.sample("anomalyd_outbox_writable"), Some(1.0));
        assert_eq!(keys(&mut o), [2], "what was logged before the fault is still there; the ack was applied");
        assert_eq!(o.append(&[msg(3)]).unwrap(), [Some(3)]);
    }
}
