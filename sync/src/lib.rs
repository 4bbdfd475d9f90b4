//! fazt-sync: the replication engine. SQLite tables become conflict-free replicated tables
//! (CRRs) following cr-sqlite's model; see docs/architecture.md.
//!
//! This first layer decides which tables *can* replicate: [`schema::check_replicable`]
//! enforces the rules every replicated table must follow, so that the node's schema is
//! replication-ready before the engine that captures and merges changes lands.

pub mod schema;

pub use schema::{check_replicable, CrrRuleViolation};
