//! What a replica reports about itself (`fazt sync status --json`), and the one part another
//! node reads back from that report: its coverage, so that `fazt sync export --since FILE`
//! writes only what the described node lacks. The JSON is a file format: fields are added
//! with defaults, never renamed.

use serde::{Deserialize, Serialize};

use crate::{Coverage, DbVersion, Error, Replica, SiteId};

/// A replica's status report; its JSON form is the `--since` file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// This replica's site id, in hex.
    pub site_id: String,
    /// The highest db_version this replica has made or merged.
    pub db_version: DbVersion,
    /// What this replica holds from each origin (itself included).
    pub coverage: Vec<OriginStatus>,
    /// Changes waiting in the pending area for a table or column this replica lacks.
    pub pending_changes: i64,
    /// Bytes the pending area holds, as counted against its cap.
    #[serde(default)]
    pub pending_bytes: i64,
    /// The pending area's caps; changes beyond them are not kept (a later sync brings them).
    #[serde(default)]
    pub pending_max_changes: i64,
    /// The pending area's cap in bytes.
    #[serde(default)]
    pub pending_max_bytes: i64,
    /// What one bundle may carry (the same on export and import).
    #[serde(default)]
    pub bundle_limits: BundleLimits,
    /// Names of the replicated tables.
    pub tables: Vec<String>,
}

/// What a replica holds from one origin.
#[derive(Debug, Serialize, Deserialize)]
pub struct OriginStatus {
    /// The origin's site id, in hex.
    pub site_id: String,
    /// Every version up to this one is held.
    pub head: DbVersion,
    /// Held version ranges (inclusive); more than one means gaps.
    pub ranges: Vec<(DbVersion, DbVersion)>,
}

/// What one bundle may carry, and what an import holds in memory at once.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct BundleLimits {
    /// Distinct names (tables, columns) in one bundle.
    pub names: u64,
    /// Bytes of those names together.
    pub name_bytes: u64,
    /// Distinct origins in one bundle.
    pub sites: u64,
    /// Changes in one origin transaction.
    pub transaction_changes: u64,
    /// Bytes of one origin transaction.
    pub transaction_bytes: u64,
    /// What an import holds in memory at once (a larger origin transaction is merged in
    /// parts of this size).
    #[serde(default)]
    pub import_part_changes: u64,
    /// The same part, in bytes.
    #[serde(default)]
    pub import_part_bytes: u64,
}

impl BundleLimits {
    /// The limits of this build.
    pub fn current() -> BundleLimits {
        use fazt_proto::bundle as b;
        BundleLimits {
            names: b::MAX_STRINGS as u64,
            name_bytes: b::MAX_STRING_BYTES,
            sites: b::MAX_SITES as u64,
            transaction_changes: b::MAX_TXN_CHANGES,
            transaction_bytes: b::MAX_TXN_BYTES,
            import_part_changes: crate::IMPORT_PART as u64,
            import_part_bytes: crate::IMPORT_PART_BYTES as u64,
        }
    }
}

/// Why a `--since` file could not be read as another replica's coverage.
#[derive(Debug, thiserror::Error)]
pub enum StatusFileError {
    /// The text is not a status report.
    #[error("{0}")]
    NotStatus(serde_json::Error),
    /// An origin's site id is not 32 hex digits.
    #[error("{0:?} is not a site id")]
    BadSiteId(String),
}

impl Status {
    /// Reads a status report (`fazt sync status --json`, perhaps another node's) back.
    pub fn from_json(text: &str) -> Result<Status, StatusFileError> {
        serde_json::from_str(text).map_err(StatusFileError::NotStatus)
    }

    /// The coverage the report describes.
    pub fn coverage(&self) -> Result<Coverage, StatusFileError> {
        let mut cov = Coverage::default();
        for origin in &self.coverage {
            let bytes: [u8; 16] = hex::decode(&origin.site_id)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| StatusFileError::BadSiteId(origin.site_id.clone()))?;
            for &(start, end) in &origin.ranges {
                cov.insert(SiteId(bytes), start, end);
            }
        }
        Ok(cov)
    }
}

impl Replica {
    /// This replica's status report.
    pub fn status(&self) -> Result<Status, Error> {
        let (pending_changes, pending_bytes) = self.pending_usage()?;
        let (pending_max_changes, pending_max_bytes) = self.pending_caps();
        Ok(Status {
            site_id: self.site_id().to_string(),
            db_version: self.db_version()?,
            coverage: self
                .coverage()?
                .0
                .iter()
                .map(|(site, set)| OriginStatus {
                    site_id: site.to_string(),
                    head: set.head(),
                    ranges: set.ranges().to_vec(),
                })
                .collect(),
            pending_changes,
            pending_bytes,
            pending_max_changes,
            pending_max_bytes,
            bundle_limits: BundleLimits::current(),
            tables: self.tables(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_report_reads_back_as_the_coverage_it_describes() {
        let site = SiteId([7; 16]);
        let mut cov = Coverage::default();
        let v = DbVersion;
        cov.insert(site, v(1), v(4));
        cov.insert(site, v(9), v(9));
        let status = Status {
            site_id: site.to_string(),
            db_version: v(9),
            coverage: vec![OriginStatus {
                site_id: site.to_string(),
                head: v(4),
                ranges: vec![(v(1), v(4)), (v(9), v(9))],
            }],
            pending_changes: 0,
            pending_bytes: 0,
            pending_max_changes: 0,
            pending_max_bytes: 0,
            bundle_limits: BundleLimits::current(),
            tables: vec![],
        };
        let text = serde_json::to_string(&status).unwrap();
        assert_eq!(Status::from_json(&text).unwrap().coverage().unwrap(), cov);
    }

    #[test]
    fn only_the_fields_of_the_first_format_are_required() {
        let status = Status::from_json(
            r#"{"site_id": "", "db_version": 0, "pending_changes": 0, "tables": [],
                "coverage": [{"site_id": "zz", "head": 0, "ranges": []}]}"#,
        )
        .unwrap();
        assert!(matches!(
            status.coverage(),
            Err(StatusFileError::BadSiteId(s)) if s == "zz"
        ));
        assert!(matches!(
            Status::from_json(r#"{"coverage": []}"#),
            Err(StatusFileError::NotStatus(_))
        ));
    }
}
