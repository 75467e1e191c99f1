//! The outbox: every verdict is written to a durable on-disk log (redb) before it is published, and
//! leaves the log only when the broker has acknowledged it. After a broker outage or a restart the
//! backlog is published again, in order, marked `"replayed": true`. The log is bounded by bytes:
//! past the bound the oldest verdicts are evicted (counted and logged), so a long outage never
//! blocks the frame path or fills the disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::telemetry::Metrics;
use crate::types::verdict::VerdictMessage;

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("verdicts");

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "outbox {path}: {reason} (is another anomalyd using the same state directory? set outbox.path to a \
         file of this daemon's own)"
    )]
    Open { path: PathBuf, reason: String },
    #[error("outbox {path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

/// A stored verdict: its key (publication order) and its JSON.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: u64,
    pub json: Vec<u8>,
}

#[derive(Debug)]
pub struct Outbox {
    db: Database,
    path: PathBuf,
    max_bytes: u64,
    bytes: u64,
    len: u64,
    next_key: u64,
    /// Keys below this were written by an earlier run of the daemon.
    first_key_this_run: u64,
    metrics: Arc<Metrics>,
}

impl Outbox {
    /// Opens (creating) the log and counts what an earlier run left in it.
    pub fn open(path: &Path, max_bytes: u64, metrics: Arc<Metrics>) -> Result<Outbox, OutboxError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| OutboxError::Open { path: path.into(), reason: e.to_string() })?;
        }
        let db = Database::create(path).map_err(|e| OutboxError::Open { path: path.into(), reason: e.to_string() })?;
        let mut outbox =
            Outbox { db, path: path.into(), max_bytes, bytes: 0, len: 0, next_key: 1, first_key_this_run: 1, metrics };
        let (mut bytes, mut len, mut last) = (0u64, 0u64, 0u64);
        {
            let tx = outbox.db.begin_write().map_err(|e| outbox.io(e))?;
            tx.open_table(TABLE).map_err(|e| outbox.io(e))?;
            tx.commit().map_err(|e| outbox.io(e))?;
        }
        let rtx = outbox.db.begin_read().map_err(|e| outbox.io(e))?;
        let table = rtx.open_table(TABLE).map_err(|e| outbox.io(e))?;
        for item in table.iter().map_err(|e| outbox.io(e))? {
            let (k, v) = item.map_err(|e| outbox.io(e))?;
            bytes += v.value().len() as u64;
            len += 1;
            last = k.value();
        }
        drop(table);
        drop(rtx);
        outbox.bytes = bytes;
        outbox.len = len;
        outbox.next_key = last + 1;
        outbox.first_key_this_run = last + 1;
        outbox.gauges();
        if len > 0 {
            tracing::info!("outbox {}: {len} verdict(s) from an earlier run will be published again", path.display());
        }
        Ok(outbox)
    }

    fn io(&self, e: impl std::fmt::Display) -> OutboxError {
        OutboxError::Io { path: self.path.clone(), reason: e.to_string() }
    }

    fn gauges(&self) {
        self.metrics.outbox_size(self.bytes, self.len);
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True for a key written by an earlier run (published again after a restart).
    pub fn from_earlier_run(&self, key: u64) -> bool {
        key < self.first_key_this_run
    }

    /// Appends verdicts in one durable transaction; returns their keys. Evicts the oldest verdicts
    /// beyond the byte bound first (a metric and a log line say how many).
    pub fn append(&mut self, msgs: &[VerdictMessage]) -> Result<Vec<u64>, OutboxError> {
        let encoded: Vec<Vec<u8>> = msgs.iter().map(|m| serde_json::to_vec(m).unwrap_or_default()).collect();
        let incoming: u64 = encoded.iter().map(|e| e.len() as u64).sum();
        let mut tx = self.db.begin_write().map_err(|e| self.io(e))?;
        tx.set_durability(Durability::Immediate).map_err(|e| self.io(e))?;
        let mut keys = Vec::with_capacity(msgs.len());
        let (mut evicted, mut evicted_bytes) = (0u64, 0u64);
        {
            let mut table = tx.open_table(TABLE).map_err(|e| self.io(e))?;
            while self.bytes + incoming > self.max_bytes && self.len > 0 {
                let Some((_, v)) = table.pop_first().map_err(|e| self.io(e))? else { break };
                let n = v.value().len() as u64;
                self.bytes -= n.min(self.bytes);
                self.len -= 1;
                evicted += 1;
                evicted_bytes += n;
            }
            for e in &encoded {
                table.insert(self.next_key, e.as_slice()).map_err(|e| self.io(e))?;
                keys.push(self.next_key);
                self.next_key += 1;
                self.bytes += e.len() as u64;
                self.len += 1;
            }
        }
        tx.commit().map_err(|e| self.io(e))?;
        if evicted > 0 {
            self.metrics.outbox_evicted(evicted);
            tracing::warn!(
                "outbox over its bound of {} bytes: evicted the {evicted} oldest unpublished verdict(s) ({evicted_bytes} bytes)",
                self.max_bytes
            );
        }
        self.gauges();
        Ok(keys)
    }

    /// Removes acknowledged verdicts. The removal is made durable by the next append (or at close):
    /// a crash in between can only publish an acknowledged verdict twice, never lose one.
    pub fn remove(&mut self, keys: &[u64]) -> Result<(), OutboxError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(|e| self.io(e))?;
        tx.set_durability(Durability::None).map_err(|e| self.io(e))?;
        {
            let mut table = tx.open_table(TABLE).map_err(|e| self.io(e))?;
            for k in keys {
                if let Some(v) = table.remove(k).map_err(|e| self.io(e))? {
                    self.bytes -= (v.value().len() as u64).min(self.bytes);
                    self.len -= 1;
                }
            }
        }
        tx.commit().map_err(|e| self.io(e))?;
        self.gauges();
        Ok(())
    }

    /// Up to `limit` stored verdicts with keys from `from`, in order.
    pub fn from_key(&self, from: u64, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        let rtx = self.db.begin_read().map_err(|e| self.io(e))?;
        let table = rtx.open_table(TABLE).map_err(|e| self.io(e))?;
        let mut out = Vec::new();
        for item in table.range(from..).map_err(|e| self.io(e))?.take(limit) {
            let (k, v) = item.map_err(|e| self.io(e))?;
            out.push(Entry { key: k.value(), json: v.value().to_vec() });
        }
        Ok(out)
    }

    /// Makes every earlier commit durable (at shutdown).
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        let mut tx = self.db.begin_write().map_err(|e| self.io(e))?;
        tx.set_durability(Durability::Immediate).map_err(|e| self.io(e))?;
        tx.commit().map_err(|e| self.io(e))
    }

    /// The oldest stored key, if any.
    pub fn first_key(&self) -> Result<Option<u64>, OutboxError> {
        Ok(self.from_key(0, 1)?.first().map(|e| e.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::intake::Intake;

    fn msg(seq: u64) -> VerdictMessage {
        let t = Intake::new_test("c", 1, true, crate::config::daemon::Trigger::EveryFrame);
        t.intake.camera.skeleton(seq, format!("c-0-{seq}"), None, std::time::SystemTime::now())
    }

    #[test]
    fn survives_reopening_in_order_and_forgets_acknowledged_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/outbox.redb");
        let m = Arc::new(Metrics::new());
        {
            let mut o = Outbox::open(&path, 1 << 20, m.clone()).unwrap();
            let keys = o.append(&[msg(1), msg(2), msg(3)]).unwrap();
            assert_eq!(keys, [1, 2, 3]);
            o.remove(&[1]).unwrap();
            assert_eq!(o.len(), 2);
        }
        let mut o = Outbox::open(&path, 1 << 20, m).unwrap();
        assert!(o.from_earlier_run(3));
        let left: Vec<u64> = o.from_key(0, 10).unwrap().iter().map(|e| e.key).collect();
        assert_eq!(left, [2, 3]);
        let back: VerdictMessage = serde_json::from_slice(&o.from_key(3, 1).unwrap()[0].json).unwrap();
        assert_eq!(back.frame_id, "c-0-3");
        assert_eq!(o.append(&[msg(4)]).unwrap(), [4], "keys continue after a restart");
        assert!(!o.from_earlier_run(4));
    }

    #[test]
    fn evicts_the_oldest_beyond_the_byte_bound_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let one = serde_json::to_vec(&msg(1)).unwrap().len() as u64;
        let mut o = Outbox::open(&dir.path().join("o.redb"), one * 5 + one / 2, m.clone()).unwrap();
        for s in 1..=8 {
            o.append(&[msg(s)]).unwrap();
        }
        assert_eq!(o.len(), 5);
        assert_eq!(o.first_key().unwrap(), Some(4), "1..=3 evicted, oldest first");
        assert_eq!(m.sample("anomalyd_outbox_evicted_total"), Some(3.0));
    }

    #[test]
    fn a_second_daemon_on_the_same_outbox_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.redb");
        let _first = Outbox::open(&path, 1 << 20, Arc::new(Metrics::new())).unwrap();
        let e = Outbox::open(&path, 1 << 20, Arc::new(Metrics::new())).unwrap_err().to_string();
        assert!(e.contains("another anomalyd"), "{e}");
    }
}
