//! fazt-sync: the replication engine. SQLite tables become conflict-free replicated tables
//! (CRRs) following cr-sqlite's model, natively in Rust; see docs/architecture.md.
//!
//! - [`schema`]: the rules a table must follow to replicate.
//! - [`Replica`]: a connection with the engine's bookkeeping; [`Replica::write`] captures
//!   local writes as origin transactions.
//! - [`Replica::replicate`]: registers a table (clock and key tables, triggers, backfill).
//! - [`Replica::changes_since`] / [`Replica::apply`]: exporting and merging [`Change`]s,
//!   with per-origin [`Coverage`] saying what a replica holds; a change's numbers are typed
//!   ([`DbVersion`], [`Seq`], [`ColVersion`], [`CausalLength`]).
//! - [`Replica::export_bundle`] / [`Replica::import_bundle_file`]: changes as files.
//! - [`Replica::fingerprint`]: what moves when there may be more to export.
//! - [`Replica::status`]: what a replica reports about itself; [`Status::coverage`] reads
//!   another node's report back for `fazt sync export --since`.

#![warn(missing_docs)]

mod bundle;
mod changes;
mod clock;
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
pub use clock::{CausalLength, ColVersion, DbVersion, Seq};
pub use coverage::{Coverage, RangeSet, SiteId};
pub use fazt_proto::wire::MAX_VERSION;
pub use merge::{
    ApplyReport, Merge, MergeHook, MAX_PENDING_BYTES, MAX_PENDING_CHANGES, PENDING_ROW_OVERHEAD,
};
pub use replica::{Fingerprint, Replica};
pub use schema::{check_replicable, CrrRuleViolation};
pub use status::{BundleLimits, OriginStatus, Status, StatusFileError};
pub use value::Value;

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite failed.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// A table does not follow the replication rules.
    #[error(transparent)]
    Rule(#[from] CrrRuleViolation),
    /// A registered table changed in a way replication cannot follow.
    #[error("{0}")]
    Schema(String),
    /// A change from outside breaks a bound or names something impossible.
    #[error("malformed change: {0}")]
    Malformed(String),
    /// The engine's own tables contradict each other.
    #[error("replication bookkeeping is damaged: {0}")]
    Corrupt(String),
    /// A bundle file is malformed or its signature does not verify.
    #[error(transparent)]
    Bundle(#[from] fazt_proto::bundle::BundleError),
    /// Reading or writing a bundle file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
