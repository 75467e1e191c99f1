//! systemd integration (`Type=notify`): READY, RELOADING, STOPPING, STATUS and watchdog pings through
//! `$NOTIFY_SOCKET`. Outside systemd every call is a no-op.

use crate::util::sync;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use super::Notifier;

#[derive(Debug)]
pub struct Systemd {
    /// Half of WatchdogSec, when the unit sets one.
    watchdog: Option<Duration>,
    last_ping: Mutex<Option<Instant>>,
}

impl Systemd {
    pub fn from_env() -> Self {
        let mut usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2));
        Self { watchdog, last_ping: Mutex::new(None) }
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::debug!("sd_notify: {e}");
        }
    }
}

impl Notifier for Systemd {
    fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }
    fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }
    fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }
    fn status(&self, msg: &str) {
        self.send(&[NotifyState::Status(msg)]);
    }
    /// Pings at most every half WatchdogSec; the daemon only calls it while every worker is alive.
    fn watchdog(&self) {
        let Some(every) = self.watchdog else { return };
        let mut last = sync::lock(&self.last_ping);
        if last.is_none_or(|t| t.elapsed() >= every) {
            self.send(&[NotifyState::Watchdog]);
            *last = Some(Instant::now());
        }
    }
}
