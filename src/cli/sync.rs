//! `fazt sync ...`: change bundles for nodes that never meet online, and sync status.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use fazt_sync::{Coverage, SiteId};
use serde::{Deserialize, Serialize};

use super::output;

#[derive(Subcommand)]
pub enum SyncCmd {
    /// Write changes to a bundle file (everything, or what the node described by --since lacks)
    Export {
        /// Output file [default: standard output]
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The receiving node's `fazt sync status --json`: export only what it lacks
        #[arg(long, value_name = "FILE")]
        since: Option<PathBuf>,
    },
    /// Apply a bundle file (importing the same bundle twice changes nothing)
    Import { file: PathBuf },
    /// Site id, clock, what this node holds from each origin, pending changes
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize, Deserialize)]
struct OriginStatus {
    site_id: String,
    /// Every version up to this one is held.
    head: i64,
    /// Held version ranges (inclusive); more than one means gaps.
    ranges: Vec<(i64, i64)>,
}

#[derive(Serialize, Deserialize)]
struct Status {
    site_id: String,
    db_version: i64,
    coverage: Vec<OriginStatus>,
    pending_changes: i64,
    /// Bytes the pending area holds, as counted against its cap.
    #[serde(default)]
    pending_bytes: i64,
    /// The pending area's caps; changes beyond them are not kept (a later sync brings them).
    #[serde(default)]
    pending_max_changes: i64,
    #[serde(default)]
    pending_max_bytes: i64,
    tables: Vec<String>,
}

pub fn run(cmd: SyncCmd, db: &Path) -> Result<()> {
    match cmd {
        SyncCmd::Status { json } => {
            let database = crate::db::open_existing(db)?;
            let coverage = database.coverage()?;
            let (pending_changes, pending_bytes) = database.pending_usage()?;
            let (pending_max_changes, pending_max_bytes) = database.pending_caps();
            let status = Status {
                site_id: database.site_id().to_string(),
                db_version: database.db_version()?,
                coverage: coverage
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
                tables: database.tables(),
            };
            if json {
                return output::json(&status);
            }
            println!("site id     {}", status.site_id);
            println!("db version  {}", status.db_version);
            println!(
                "pending     {} changes, {} (caps: {} changes, {}; beyond them changes are not kept and come again with a later sync)",
                status.pending_changes,
                output::size(u64::try_from(status.pending_bytes).unwrap_or(0)),
                status.pending_max_changes,
                output::size(u64::try_from(status.pending_max_bytes).unwrap_or(0)),
            );
            println!("tables      {}", status.tables.join(", "));
            let rows: Vec<Vec<String>> = status
                .coverage
                .iter()
                .map(|o| {
                    let gaps = o.ranges.len().saturating_sub(usize::from(o.head > 0));
                    vec![
                        if o.site_id == status.site_id {
                            format!("{} (this node)", o.site_id)
                        } else {
                            o.site_id.clone()
                        },
                        o.head.to_string(),
                        if gaps == 0 {
                            String::new()
                        } else {
                            format!("{gaps} gaps")
                        },
                    ]
                })
                .collect();
            println!();
            output::table(&["ORIGIN", "HEAD", ""], &rows);
            Ok(())
        }
        SyncCmd::Export { output, since } => {
            let have = match &since {
                Some(path) => read_coverage(path)?,
                None => Coverage::default(),
            };
            let database = crate::db::open_existing(db)?;
            let report = match &output {
                Some(path) => database.export_bundle_file(&have, path)?,
                None => {
                    let stdout = std::io::stdout();
                    if stdout.is_terminal() {
                        bail!("a bundle is binary: write it to a file with -o FILE (or redirect standard output)");
                    }
                    database.export_bundle(&have, std::io::BufWriter::new(stdout.lock()))?
                }
            };
            eprintln!(
                "exported {} changes ({}){}",
                report.changes,
                output::size(report.bytes),
                output
                    .as_ref()
                    .map(|p| format!(" to {}", p.display()))
                    .unwrap_or_default()
            );
            Ok(())
        }
        SyncCmd::Import { file } => {
            if !file.exists() {
                bail!("no bundle at {}", file.display());
            }
            let mut database = super::open_for_write(db)?;
            let report = database
                .import_bundle_file(&file)
                .with_context(|| format!("importing {}", file.display()))?;
            println!(
                "imported {} transactions: {} changes applied, {} already held, {} superseded, {} waiting for a newer schema",
                report.transactions, report.applied, report.already_seen, report.unchanged, report.pending
            );
            if report.pending_full > 0 {
                println!(
                    "{} changes for a newer schema were not kept: the pending area is full (see `fazt sync status`); import again after updating this node",
                    report.pending_full
                );
            }
            // Content the bundle deleted that this node still references goes back.
            let rescued = crate::hosting::gc::rescue(&mut database)?;
            if rescued.blobs > 0 || rescued.versions > 0 {
                println!(
                    "re-inserted {} blobs and {} versions the bundle deleted that apps here still use",
                    rescued.blobs, rescued.versions
                );
            }
            Ok(())
        }
    }
}

/// Reads the coverage part of a `fazt sync status --json` file.
fn read_coverage(path: &Path) -> Result<Coverage> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let status: Status = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{} is not the output of `fazt sync status --json`: {e}",
            path.display()
        )
    })?;
    let mut cov = Coverage::default();
    for origin in status.coverage {
        let bytes: [u8; 16] = hex::decode(&origin.site_id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("{}: {:?} is not a site id", path.display(), origin.site_id))?;
        for (start, end) in origin.ranges {
            cov.insert(SiteId(bytes), start, end);
        }
    }
    Ok(cov)
}
