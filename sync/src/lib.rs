//! fazt-sync: the replication engine. SQLite tables become conflict-free replicated tables
//! (CRRs) following cr-sqlite's model, natively in Rust; see docs/architecture.md.
//!
//! - [`schema`]: the rules a table must follow to replicate.
//! - [`Replica`]: a connection with the engine's bookkeeping; [`Replica::write`] captures
//!   local writes as origin transactions.
//! - [`Replica::replicate`]: registers a table (clock and key tables, triggers, backfill).
//! - [`Replica::changes_since`] / [`Replica::apply`]: exporting and merging [`Change`]s,
//!   with per-origin [`Coverage`] saying what a replica holds.
//! - [`Replica::export_bundle`] / [`Replica::import_bundle_file`]: changes as files.
//! - [`Replica::status`]: what a replica reports about itself; [`Status::coverage`] reads
//!   another node's report back for `fazt sync export --since`.

mod bundle;
mod changes;
mod coverage;
mod crr;
mod merge;
pub mod pack;
mod replica;
pub mod schema;
mod status;
mod value;

pub use bundle::{ExportReport, IMPORT_PART, IMPORT_PART_BYTES};
pub use changes::{Batch, Change, Exported, ROW_CID};
pub use coverage::{Coverage, RangeSet, SiteId};
pub use fazt_proto::wire::MAX_VERSION;
pub use merge::{ApplyReport, Merge, MergeHook, MAX_PENDING_BYTES, MAX_PENDING_CHANGES};
pub use replica::Replica;
pub use schema::{check_replicable, CrrRuleViolation};
pub use status::{BundleLimits, OriginStatus, Status, StatusFileError};
pub use value::Value;

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Rule(#[from] CrrRuleViolation),
    #[error("{0}")]
    Schema(String),
    #[error("malformed change: {0}")]
    Malformed(String),
    #[error("replication bookkeeping is damaged: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Bundle(#[from] fazt_proto::bundle::BundleError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
