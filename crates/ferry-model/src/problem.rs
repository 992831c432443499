//! `ObjectError`: what was wrong with one Kubernetes object, and what ferry did about it.
//!
//! Bad input never stops the rest of the cluster from being served: the planner
//! skips the malformed object (or the one malformed entry inside it) and reports
//! an `ObjectError` that names the object, the field and the consequence.

use crate::state::ObjectKey;
use serde::Serialize;
use std::fmt;

/// Which kind of object a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        })
    }
}

/// What ferry did with the object that had the problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Consequence {
    /// The whole object is ignored until it is fixed.
    ObjectSkipped,
    /// Only the named entry (one endpoint, one address) is ignored.
    EntrySkipped,
    /// Nothing is skipped; the operator should still know.
    Warning,
}

/// A validation finding on one object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectError {
    pub kind: ObjectKind,
    pub object: ObjectKey,
    /// JSON path of the offending field, e.g. `spec.ports[1].port`.
    pub field: String,
    pub message: String,
    pub consequence: Consequence,
}

impl ObjectError {
    pub fn skip(kind: ObjectKind, object: &ObjectKey, field: impl Into<String>, message: impl Into<String>) -> Self {
        ObjectError {
            kind,
            object: object.clone(),
            field: field.into(),
            message: message.into(),
            consequence: Consequence::ObjectSkipped,
        }
    }

    pub fn skip_entry(
        kind: ObjectKind,
        object: &ObjectKey,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ObjectError { consequence: Consequence::EntrySkipped, ..Self::skip(kind, object, field, message) }
    }

    pub fn warn(kind: ObjectKind, object: &ObjectKey, field: impl Into<String>, message: impl Into<String>) -> Self {
        ObjectError { consequence: Consequence::Warning, ..Self::skip(kind, object, field, message) }
    }
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.consequence {
            ObjectConsequence::ObjectSkipped => {
                format!("this {} is skipped until it is fixed; everything else is still served", self.kind)
            }
            ObjectConsequence::EntrySkipped => "this entry is ignored; the rest of the object is served".to_string(),
            ObjectConsequence::Warning => "warning only; nothing is skipped".to_string(),
        };
        write!(f, "{} {}: {}: {} ({what})", self.kind, self.object, self.field, self.message)
    }
}

use Consequence as ObjectConsequence;
