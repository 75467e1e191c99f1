//! The line page's live state: per camera, verdict counts, the NG rate, frames/s, the last verdict and
//! the last NG frame, kept from the cameras' result broadcasts (which never wait for a reader), and fanned
//! out to the open pages as server-sent events through a bounded broadcast: a page that falls behind skips
//! ahead, and the frame path never notices it.

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
    events: broadcast::Sender<Arc<str>>,
    pub metrics: Arc<Metrics>,
}

impl Board {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { tiles: Mutex::default(), events: broadcast::channel(EVENT_BACKLOG).0, metrics }
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
        let tile = {
            let mut tiles = sync::lock(&self.tiles);
            let t = tiles.entry(cam.name.clone()).or_insert_with(|| Tile::new(cam));
            t.count(m, cam);
            t.clone()
        };
        if self.events.receiver_count() > 0
            && let Ok(json) = serde_json::to_string(&tile)
        {
            let _ = self.events.send(json.into());
        }
    }

    /// Follows every camera (and those a reload adds) until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        cameras: Arc<Mutex<BTreeMap<String, Arc<CameraShared>>>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut followed: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            let now: Vec<Arc<CameraShared>> = sync::lock(&cameras).values().cloned().collect();
            for cam in now {
                if followed.get(&cam.name).is_some_and(|h| !h.is_finished()) {
                    continue;
                }
                sync::lock(&self.tiles).entry(cam.name.clone()).or_insert_with(|| Tile::new(&cam));
                let (board, mut rx, mut stop) = (self.clone(), cam.results(), stop.clone());
                let name = cam.name.clone();
                followed.insert(
                    name,
                    tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                r = rx.recv() => match r {
                                    Ok(m) => board.update(&cam, &m),
                                    Err(broadcast::error::RecvError::Lagged(n)) => board.metrics.ui_events_skipped(n),
                                    Err(broadcast::error::RecvError::Closed) => return,
                                },
                                _ = stop.changed() => return,
                            }
                        }
                    }),
                );
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
        }
        for (_, h) in followed {
            h.abort();
        }
    }
}
