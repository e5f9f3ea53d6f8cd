//! The line formats exchanged as JSON Lines, as serde types shared by
//! their writers and readers: the factory line (`factory provision`'s
//! chips.jsonl), the import line (a factory batch returned after
//! personalization) and the progress stream of `/v1/import`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One line of chips.jsonl (`microcert factory provision`): what a chip
/// needs to be personalized. The transport key is secret: this type's
/// `Debug` redacts it, and its writer keeps it in zeroized buffers.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct FactoryLine<'a> {
    /// The device id, 16 hex digits.
    #[serde(borrow)]
    pub device_id: Cow<'a, str>,
    /// The transport-key epoch.
    pub epoch: u8,
    /// Ktr(device, epoch), 32 hex digits.
    #[serde(borrow)]
    pub transport_key: Cow<'a, str>,
    /// The RFC 7228 class.
    pub class: u8,
    /// The suite id.
    pub suite: u8,
    /// When it was issued (Unix seconds).
    pub issued: u64,
}

impl fmt::Debug for FactoryLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FactoryLine")
            .field("device_id", &self.device_id)
            .field("epoch", &self.epoch)
            .field("transport_key", &"<redacted>")
            .field("class", &self.class)
            .field("suite", &self.suite)
            .field("issued", &self.issued)
            .finish()
    }
}

/// One line of a factory batch (the input of `Center::import_batch`):
/// a chip's first ENROLL under its Ktr(device, epoch). Unknown fields are
/// ignored.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImportLine<'a> {
    /// The device id, 16 hex digits.
    #[serde(borrow)]
    pub device_id: Cow<'a, str>,
    /// The RFC 7228 class.
    pub class: u8,
    /// The transport-key epoch.
    pub epoch: u8,
    /// The ENROLL's bytes in hex (borrowed from the line unless it has
    /// escapes: its 2 KB are not copied).
    #[serde(borrow)]
    pub enroll: Cow<'a, str>,
}

/// One rejected entry, as `/v1/import` streams it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RejectedLine {
    /// Line number, from 1.
    pub line: u64,
    /// The refusal kind.
    pub error: String,
    /// What was wrong.
    pub message: String,
}

/// The summary that ends an import stream.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Lines read.
    pub lines: u64,
    /// Lines skipped because an earlier run had committed them.
    pub resumed_after: u64,
    /// Seeds enrolled by this run.
    pub enrolled: u64,
    /// Entries already enrolled with the same ENROLL.
    pub already: u64,
    /// Rejected entries by refusal kind.
    pub refused: BTreeMap<String, u64>,
}

/// One line of the NDJSON reply of `/v1/import`: a `progress` line after
/// every committed chunk (with that chunk's rejected entries), then
/// exactly one `done` or `error` line.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ImportEvent {
    /// A chunk was committed.
    Progress {
        /// Lines committed so far (including skipped and rejected ones).
        lines_done: u64,
        /// Lines in the batch when the client declared them, else 0.
        lines_total: u64,
        /// Seeds enrolled so far by this run.
        enrolled: u64,
        /// This chunk's rejected entries.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rejected: Vec<RejectedLine>,
    },
    /// The import finished.
    Done(ImportSummary),
    /// The import stopped; what was committed before stays (run it again
    /// to resume).
    Error {
        /// The error kind.
        error: String,
        /// What went wrong.
        message: String,
    },
}
