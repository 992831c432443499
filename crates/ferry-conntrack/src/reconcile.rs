//! The reconciler: list each family's UDP entries, keep the stale ones
//! ([`StaleFlowIndex`]), delete them, and say how it went.

use crate::table::Conntrack;
use ferry_model::stale::StaleFlowIndex;
use ferry_model::{IpFamily, Protocol};
use std::time::{Duration, Instant};

/// What one reconcile did in one family's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyReconcile {
    pub family: IpFamily,
    /// UDP entries listed.
    pub listed: usize,
    /// Entries the rule found stale.
    pub stale: usize,
    pub deleted: usize,
    /// Stale entries that were gone by the time they were deleted.
    pub already_gone: usize,
    /// Deletes the kernel refused (see `error`).
    pub failed: usize,
    /// Listing plus deleting.
    pub duration: Duration,
    /// The dump kept being interrupted by changes; the last, partial listing was used.
    pub partial: bool,
    /// What failed, if listing or deleting did: the family's table is then left as it was found,
    /// or partly cleaned.
    pub error: Option<String>,
}

/// What one reconcile did, per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub families: Vec<FamilyReconcile>,
}

impl ReconcileReport {
    pub fn deleted(&self) -> usize {
        self.families.iter().map(|f| f.deleted).sum()
    }

    pub fn duration(&self) -> Duration {
        self.families.iter().map(|f| f.duration).sum()
    }

    pub fn errors(&self) -> impl Iterator<Item = &str> {
        self.families.iter().filter_map(|f| f.error.as_deref())
    }
}

impl Conntrack {
    /// Deletes the stale UDP flows of `families`' tables: kube-proxy's conntrack
    /// reconciler. Each family's table is listed once (the kernel sends only
    /// UDP entries), every entry is checked against `index` as it is read, and
    /// the stale ones are deleted in batches.
    ///
    /// Errors do not stop the other families; they are in the report.
    pub fn reconcile(&mut self, index: &StaleFlowIndex, families: &[IpFamily]) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        for &family in families {
            let t0 = Instant::now();
            let mut r = FamilyReconcile {
                family,
                listed: 0,
                stale: 0,
                deleted: 0,
                already_gone: 0,
                failed: 0,
                duration: Duration::ZERO,
                partial: false,
                error: None,
            };
            let stale = |e: &crate::Entry| {
                index.is_stale(Protocol::Udp, e.orig.dst.ip(), e.orig.dst.port(), e.reply.src.ip(), e.reply.src.port())
            };
            match self.list(family, Some(Protocol::Udp), stale) {
                Ok(listing) => {
                    r.listed = listing.listed;
                    r.partial = !listing.complete;
                    r.stale = listing.entries.len();
                    match self.delete_all(&listing.entries) {
                        Ok(d) => {
                            r.deleted = d.deleted;
                            r.already_gone = d.already_gone;
                            r.failed = d.failed;
                            r.error = d.first_failure.map(|f| format!("{} deletes failed, first: {f}", d.failed));
                        }
                        Err(e) => r.error = Some(e.to_string()),
                    }
                }
                Err(e) => r.error = Some(e.to_string()),
            }
            r.duration = t0.elapsed();
            report.families.push(r);
        }
        report
    }
}
