//! The line page's live state: per camera, verdict counts, the NG rate, frames/s, the last verdict and
//! the last NG frame, kept from the cameras' result broadcasts (which never wait for a reader), and fanned
//! out to the open pages as server-sent events through a bounded broadcast: a page that falls behind skips
//! ahead, and the frame path never notices it. A tile goes out at most every [`PUSH_MS`] (its counts are
//! totals, so nothing is lost by skipping the ones between): a person cannot read faster, and a page
//! redrawn for every frame costs a panel PC more than the inspection does.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::source::intake::CameraShared;
use crate::telemetry::Metrics;
use crate::types::verdict::{Outcome, VerdictMessage};
use crate::util::sync;

/// Events an open page may lag behind before it skips ahead.
pub const EVENT_BACKLOG: usize = 256;

/// Least time between two events of one camera's tile.
pub const PUSH_MS: u64 = 200;

/// frames/s is counted over this window.
const RATE_WINDOW_MS: u64 = 10_000;

/// One camera's tile.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tile {
    pub camera: String,
    pub ok: u64,
    pub ng: u64,
    pub skipped: u64,
    pub error: u64,
    /// NG over OK + NG, since the daemon started.
    pub ng_rate: f64,
    pub fps: f64,
    pub recipe: Option<String>,
    pub trigger: String,
    pub last: Option<VerdictMessage>,
    /// The newest NG frame's id (its overlay is the tile's picture).
    pub last_ng: Option<String>,
    #[serde(skip)]
    times: VecDeque<u64>,
}

impl Tile {
    fn new(cam: &CameraShared) -> Self {
        Self {
            camera: cam.name.clone(),
            recipe: cam.model().recipe.clone(),
            trigger: trigger_words(cam),
            ..Default::default()
        }
    }

    fn count(&mut self, m: &Arc<VerdictMessage>, cam: &CameraShared) {
        match m.verdict {
            Outcome::Ok => self.ok += 1,
            Outcome::Ng => {
                self.ng += 1;
                self.last_ng = Some(m.frame_id.clone());
            }
            Outcome::Skipped => self.skipped += 1,
            Outcome::Error => self.error += 1,
        }
        let judged = self.ok + self.ng;
        self.ng_rate = if judged > 0 { self.ng as f64 / judged as f64 } else { 0.0 };
        // When the verdict was made (it is published later, by the link).
        let now = verdict_unix_ms(m);
        self.times.push_back(now);
        while self.times.front().is_some_and(|&t| t + RATE_WINDOW_MS < now) {
            self.times.pop_front();
        }
        let span = self.times.back().zip(self.times.front()).map_or(0, |(b, f)| b - f);
        self.fps =
            if self.times.len() > 1 && span > 0 { (self.times.len() - 1) as f64 * 1e3 / span as f64 } else { 0.0 };
        self.recipe = cam.model().recipe.clone();
        self.trigger = trigger_words(cam);
        self.last = Some((**m).clone());
    }
}

/// When a verdict was made: its capture time plus its latency to hand-over.
pub fn verdict_unix_ms(m: &VerdictMessage) -> u64 {
    m.captured_unix_ms + m.latency_ms.total.max(0.0) as u64
}

fn trigger_words(cam: &CameraShared) -> String {
    match cam.trigger_mode() {
        crate::config::daemon::Trigger::EveryFrame => "every frame".into(),
        crate::config::daemon::Trigger::Triggered => "PLC trigger".into(),
    }
}

#[derive(Debug)]
pub struct Board {
    tiles: Mutex<BTreeMap<String, Tile>>,
    /// Tiles changed since they last went out.
    dirty: Mutex<std::collections::BTreeSet<String>>,
    events: broadcast::Sender<Arc<str>>,
    pub metrics: Arc<Metrics>,
}

impl Board {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { tiles: Mutex::default(), dirty: Mutex::default(), events: broadcast::channel(EVENT_BACKLOG).0, metrics }
    }

    /// Every tile as it stands.
    pub fn tiles(&self) -> Vec<Tile> {
        sync::lock(&self.tiles).values().cloned().collect()
    }

    /// The events from now on: one JSON tile per verdict.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    fn update(&self, cam: &CameraShared, m: &Arc<VerdictMessage>) {
        sync::lock(&self.tiles).entry(cam.name.clone()).or_insert_with(|| Tile::new(cam)).count(m, cam);
        sync::lock(&self.dirty).insert(cam.name.clone());
    }

    /// Sends every tile that changed since the last push (when a page is following).
    fn push(&self) {
        let changed = std::mem::take(&mut *sync::lock(&self.dirty));
        if changed.is_empty() || self.events.receiver_count() == 0 {
            return;
        }
        let tiles: Vec<Tile> = {
            let all = sync::lock(&self.tiles);
            changed.iter().filter_map(|c| all.get(c).cloned()).collect()
        };
        for t in tiles {
            if let Ok(json) = serde_json::to_string(&t) {
                let _ = self.events.send(json.into());
            }
        }
    }

    /// Follows every camera (and those a reload adds: looked for once a second) and pushes changed
    /// tiles every [`PUSH_MS`], until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        cameras: Arc<Mutex<BTreeMap<String, Arc<CameraShared>>>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut followed: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
        let mut push = tokio::time::interval(std::time::Duration::from_millis(PUSH_MS));
        let mut scan = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = push.tick() => self.push(),
                _ = scan.tick() => self.follow_new(&cameras, &mut followed, &stop),
                _ = stop.changed() => break,
            }
        }
        for (_, h) in followed {
            h.abort();
        }
    }

    fn follow_new(
        self: &Arc<Self>,
        cameras: &Mutex<BTreeMap<String, Arc<CameraShared>>>,
        followed: &mut BTreeMap<String, tokio::task::JoinHandle<()>>,
        stop: &watch::Receiver<bool>,
    ) {
        let now: Vec<Arc<CameraShared>> = sync::lock(cameras).values().cloned().collect();
        for cam in now {
            if followed.get(&cam.name).is_some_and(|h| !h.is_finished()) {
                continue;
            }
            sync::lock(&self.tiles).entry(cam.name.clone()).or_insert_with(|| Tile::new(&cam));
            let (board, mut rx, mut stop) = (self.clone(), cam.results(), stop.clone());
            let name = cam.name.clone();
            // Weak: a camera's shared state holds the verdict channel, which must close when the daemon
            // stops the camera (the publisher finishes then), whoever still follows it.
            let cam = Arc::downgrade(&cam);
            let task = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = rx.recv() => match r {
                            Ok(m) => match cam.upgrade() {
                                Some(cam) => board.update(&cam, &m),
                                None => return,
                            },
                            Err(broadcast::error::RecvError::Lagged(n)) => board.metrics.ui_events_skipped(n),
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                        _ = stop.changed() => return,
                    }
                }
            });
            followed.insert(name, task);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::daemon::Trigger;
    use crate::source::intake::Intake;

    #[test]
    fn tiles_count_every_verdict_and_go_out_coalesced() {
        let t = Intake::new_test("cam", 1, true, Trigger::EveryFrame);
        let cam = &t.intake.camera;
        let board = Board::new(Arc::new(Metrics::new()));
        board.push();
        let mut rx = board.subscribe();
        for (i, v) in [Outcome::Ok, Outcome::Ng, Outcome::Ok, Outcome::Error].into_iter().enumerate() {
            let seq = i as u64 + 1;
            let mut m = cam.skeleton(seq, format!("cam-0-{seq}"), None, std::time::SystemTime::now(), None);
            m.verdict = v;
            m.captured_unix_ms = 1_000 + 100 * seq;
            m.latency_ms.total = 0.0;
            board.update(cam, &Arc::new(m));
        }
        board.push();
        let tile: serde_json::Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
        assert_eq!((tile["ok"].as_u64(), tile["ng"].as_u64(), tile["error"].as_u64()), (Some(2), Some(1), Some(1)));
        assert_eq!(tile["last_ng"], "cam-0-2");
        assert_eq!(tile["last"]["frame_id"], "cam-0-4");
        assert!((tile["ng_rate"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9);
        assert!((tile["fps"].as_f64().unwrap() - 10.0).abs() < 1e-9, "4 verdicts 100 ms apart: {tile}");
        assert!(rx.try_recv().is_err(), "four verdicts, one event");
        board.push();
        assert!(rx.try_recv().is_err(), "nothing changed, nothing sent");
    }
}
