//! What both ends of the Raft transport share: the header that announces early appends,
//! and how a snapshot transfer is described in the logs. (The messages themselves are
//! openraft's serde types as JSON inside `proto::RaftMessage`.)

use std::fmt::Display;

/// Response header of an AppendEntries stream whose server answers early appends.
pub const EARLY_APPEND_HEADER: &str = "meshbridge-early-append";

/// Progress of a snapshot transfer, for the logs.
pub struct Progress<'a> {
    pub id: &'a str,
    pub offset: u64,
    pub len: usize,
    pub done: bool,
}

impl Display for Progress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let end = self.offset.saturating_add(self.len as u64);
        write!(f, "{} bytes {}..{end}", self.id, self.offset)?;
        if self.done {
            write!(f, " (last chunk, {end} bytes in all)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// The offset comes from the peer that sends the snapshot: its log line never
    /// overflows.
    #[test]
    fn a_chunk_at_the_top_of_the_range_is_shown() {
        let p = super::Progress {
            id: "s",
            offset: u64::MAX,
            len: 10,
            done: false,
        };
        assert!(p.to_string().contains(&u64::MAX.to_string()), "{p}");
    }
}
