//! The MCS conditions on a ServiceExport: `Valid` (can it be exported), `Ready` (does the
//! registry hold its latest state) and `Conflict` (does another site's definition win).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// One condition as the adapter decides it, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// The conditions to write, keeping `lastTransitionTime` of those whose status did not
/// change; None when `current` says the same already (nothing to write).
pub fn merge(
    current: &[Condition],
    want: &[Cond],
    generation: Option<i64>,
) -> Option<Vec<Condition>> {
    let mut changed = current.len() != want.len();
    let mut out = Vec::new();
    for w in want {
        let status = if w.status { "True" } else { "False" };
        let old = current.iter().find(|c| c.type_ == w.type_);
        let same = old.is_some_and(|c| {
            c.status == status
                && c.reason == w.reason
                && c.message == w.message
                && c.observed_generation == generation
        });
        changed |= !same;
        let last_transition_time = match old {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(Timestamp::now()),
        };
        out.push(Condition {
            type_: w.type_.to_string(),
            status: status.to_string(),
            reason: w.reason.clone(),
            message: w.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_conditions_are_not_rewritten_and_transitions_keep_time() {
        let want = vec![
            Cond::new("Valid", true, "Valid", "ok"),
            Cond::new("Ready", false, "Pending", "waiting"),
        ];
        let first = merge(&[], &want, Some(1)).unwrap();
        assert!(merge(&first, &want, Some(1)).is_none());
        let mut again = want.clone();
        again[1] = Cond::new("Ready", false, "Pending", "still waiting");
        let second = merge(&first, &again, Some(1)).unwrap();
        assert_eq!(
            second[1].last_transition_time, first[1].last_transition_time,
            "same status keeps its time"
        );
        assert_eq!(second[1].message, "still waiting");
    }
}
