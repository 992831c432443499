//! When the agent syncs (pure): kube-proxy's bounded-frequency runner.
//!
//! - Nothing is programmed before the source says Services and EndpointSlices
//!   are listed (`ready`).
//! - After a change, the next sync starts as soon as `min_sync_period` has
//!   passed since the previous one started, so a burst becomes one sync.
//! - With nothing changing, the datapath is verified against the Plan every
//!   `sync_period` (a resync).
//! - A failed sync is retried with a backoff from `min_sync_period` (at least
//!   a second) doubling up to `sync_period`, sooner never.
//! - One sync runs at a time.

use std::time::{Duration, Instant};

/// What is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Program the current state.
    Sync,
    /// Verify the datapath against the last Plan.
    Resync,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    min_sync: Duration,
    sync_period: Duration,
    ready: bool,
    in_flight: Option<Due>,
    last_sync_start: Option<Instant>,
    /// When the datapath was last known to match (a sync or resync finished).
    last_verified: Option<Instant>,
    /// The state differs from what is programmed (always, before the first sync).
    dirty: bool,
    failures: u32,
    retry_at: Option<Instant>,
    /// A resync was asked for (SIGHUP): due as soon as nothing else is.
    resync_requested: bool,
}

impl Schedule {
    pub fn new(min_sync: Duration, sync_period: Duration) -> Schedule {
        Schedule {
            min_sync,
            sync_period,
            ready: false,
            in_flight: None,
            last_sync_start: None,
            last_verified: None,
            dirty: true,
            failures: 0,
            retry_at: None,
            resync_requested: false,
        }
    }

    /// Verify the datapath now (after any pending sync) instead of at the next period.
    pub fn request_resync(&mut self) {
        self.resync_requested = true;
    }

    /// The source has listed everything (and the node's addresses are known):
    /// syncs may begin.
    pub fn set_ready(&mut self) {
        self.ready = true;
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The state changed.
    pub fn changed(&mut self) {
        self.dirty = true;
    }

    pub fn in_flight(&self) -> Option<Due> {
        self.in_flight
    }

    /// What is due next, and when (maybe in the past: due now). `None`:
    /// nothing until something changes or the running sync finishes.
    pub fn next(&self) -> Option<(Instant, Due)> {
        if !self.ready || self.in_flight.is_some() {
            return None;
        }
        if self.dirty {
            let mut at = self.last_sync_start.map(|t| t + self.min_sync);
            if let Some(retry) = self.retry_at {
                at = Some(at.map_or(retry, |a| a.max(retry)));
            }
            // `None` here means "never synced": now.
            return Some((at.unwrap_or_else(Instant::now), Due::Sync));
        }
        if self.resync_requested {
            return Some((Instant::now(), Due::Resync));
        }
        self.last_verified.map(|t| (t + self.sync_period, Due::Resync))
    }

    /// `due` starts now.
    pub fn started(&mut self, due: Due, now: Instant) {
        self.in_flight = Some(due);
        if due == Due::Resync {
            self.resync_requested = false;
        }
        if due == Due::Sync {
            self.last_sync_start = Some(now);
            // Changes from here on are not in this sync.
            self.dirty = false;
        }
    }

    /// The running sync or resync finished.
    pub fn finished(&mut self, ok: bool, now: Instant) {
        self.in_flight = None;
        if ok {
            self.failures = 0;
            self.retry_at = None;
            self.last_verified = Some(now);
        } else {
            // A failed apply leaves the kernel in an unknown state: a full sync is due.
            self.dirty = true;
            let backoff = self.min_sync.max(Duration::from_secs(1)) * 2u32.saturating_pow(self.failures.min(16));
            self.failures += 1;
            self.retry_at = Some(now + backoff.min(self.sync_period));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const PERIOD: Duration = Duration::from_secs(30);

    #[test]
    fn nothing_before_ready_then_a_sync_at_once() {
        let mut s = Schedule::new(MIN, PERIOD);
        assert_eq!(s.next(), None);
        s.set_ready();
        let (at, due) = s.next().unwrap();
        assert_eq!(due, Due::Sync);
        assert!(at <= Instant::now());
    }

    #[test]
    fn a_burst_waits_for_the_min_sync_period_and_quiet_means_resync() {
        let mut s = Schedule::new(MIN, PERIOD);
        s.set_ready();
        let t0 = Instant::now();
        s.started(Due::Sync, t0);
        s.changed();
        assert_eq!(s.next(), None, "one sync at a time");
        s.finished(true, t0 + Duration::from_millis(100));
        assert_eq!(s.next(), Some((t0 + MIN, Due::Sync)), "the change made during the sync waits for min_sync_period");
        s.started(Due::Sync, t0 + MIN);
        s.finished(true, t0 + MIN + Duration::from_millis(10));
        assert_eq!(s.next(), Some((t0 + MIN + Duration::from_millis(10) + PERIOD, Due::Resync)));
        s.started(Due::Resync, t0 + PERIOD);
        s.changed();
        assert_eq!(s.next(), None);
        s.finished(true, t0 + PERIOD);
        assert_eq!(s.next(), Some((t0 + MIN + MIN, Due::Sync)));
    }

    #[test]
    fn failures_back_off_up_to_the_sync_period() {
        let mut s = Schedule::new(Duration::ZERO, Duration::from_secs(5));
        s.set_ready();
        let t0 = Instant::now();
        let mut gaps = Vec::new();
        let mut now = t0;
        for _ in 0..5 {
            s.started(Due::Sync, now);
            s.finished(false, now);
            let (at, due) = s.next().unwrap();
            assert_eq!(due, Due::Sync);
            gaps.push(at - now);
            now = at;
        }
        assert_eq!(gaps, [1, 2, 4, 5, 5].map(Duration::from_secs));
        s.started(Due::Sync, now);
        s.finished(true, now);
        assert_eq!(s.next().unwrap().1, Due::Resync);
    }
}
