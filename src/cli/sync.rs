//! `fazt sync ...`: change bundles for nodes that never meet online, and sync status.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use fazt_proto::NodeId;
use fazt_sync::{Coverage, Status, StatusFileError};

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
    /// Apply a bundle file signed by this node or a trusted peer (importing the same
    /// bundle twice changes nothing)
    Import {
        file: PathBuf,
        /// Also accept a bundle signed by a node that is not a trusted peer, or not signed
        /// at all: whoever made it can then write anything into this node's replicated data
        #[arg(long)]
        trust_unknown_signer: bool,
    },
    /// Site id, clock, what this node holds from each origin, pending changes
    Status {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: SyncCmd, db: &Path) -> Result<()> {
    match cmd {
        SyncCmd::Status { json } => {
            let database = crate::db::open_existing(db)?;
            let status = database.status()?;
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
            let limits = &status.bundle_limits;
            println!(
                "bundles     at most {} changes and {} per origin transaction, {} sites, {} names ({}); an import holds at most {} changes ({}) in memory at once",
                limits.transaction_changes,
                output::size(limits.transaction_bytes),
                limits.sites,
                limits.names,
                output::size(limits.name_bytes),
                limits.import_part_changes,
                output::size(limits.import_part_bytes),
            );
            println!("tables      {}", status.tables.join(", "));
            let rows: Vec<Vec<String>> = status
                .coverage
                .iter()
                .map(|o| {
                    let gaps = o
                        .ranges
                        .len()
                        .saturating_sub(usize::from(o.head > fazt_sync::DbVersion(0)));
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
            crate::identity::ensure(database.conn())?;
            let key = crate::identity::load(database.conn())?
                .ok_or_else(|| anyhow!("this node has no key to sign the bundle with"))?;
            let report = match &output {
                Some(path) => database.export_bundle_file(&have, &key, path)?,
                None => {
                    let stdout = std::io::stdout();
                    if stdout.is_terminal() {
                        bail!("a bundle is binary: write it to a file with -o FILE (or redirect standard output)");
                    }
                    database.export_bundle(&have, &key, std::io::BufWriter::new(stdout.lock()))?
                }
            };
            eprintln!(
                "exported {} changes ({}){}, signed by this node ({})",
                report.changes,
                output::size(report.bytes),
                output
                    .as_ref()
                    .map(|p| format!(" to {}", p.display()))
                    .unwrap_or_default(),
                crate::identity::node_id(&key)
            );
            Ok(())
        }
        SyncCmd::Import {
            file,
            trust_unknown_signer,
        } => {
            if !file.exists() {
                bail!("no bundle at {}", file.display());
            }
            let mut database = super::open_for_write(db)?;
            let own = crate::identity::ensure(database.conn())?;
            let mut signed_by = String::new();
            let report = {
                let conn_peers = peers_by_key(database.conn())?;
                database
                    .import_bundle_file(&file, |v: &fazt_proto::bundle::Verified| {
                        signed_by = check_signer(v.signer, own, &conn_peers, trust_unknown_signer)?;
                        Ok::<(), anyhow::Error>(())
                    })
                    .with_context(|| format!("importing {}", file.display()))?
            };
            println!("{signed_by}");
            println!(
                "imported {} transactions: {} changes applied, {} already held, {} superseded, {} waiting for tables or columns this node does not have (a newer schema's, or tables it never replicates)",
                report.transactions, report.applied, report.already_seen, report.unchanged, report.pending
            );
            if report.pending_full > 0 {
                println!(
                    "{} changes for tables or columns this node does not have were not kept: the pending area is full (see `fazt sync status`); import again after updating this node",
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

/// Trusted peers by node id, with their names.
fn peers_by_key(conn: &rusqlite::Connection) -> Result<Vec<(NodeId, String)>> {
    Ok(crate::peer::store::list(conn)?
        .into_iter()
        .map(|p| (p.node_id, p.name.as_str().to_string()))
        .collect())
}

/// Decides whether a bundle's (verified) signer is trusted; returns the line that says who
/// signed it. Only this node and pinned peers are trusted, unless `trust_unknown` is given;
/// a bad signature never gets here (reading the bundle fails first).
fn check_signer(
    signer: Option<NodeId>,
    own: NodeId,
    peers: &[(NodeId, String)],
    trust_unknown: bool,
) -> Result<String> {
    let Some(signer) = signer else {
        if trust_unknown {
            return Ok("the bundle is unsigned (an older fazt's format); imported because of --trust-unknown-signer".into());
        }
        bail!("the bundle is unsigned (format version 1, from an older fazt), so anyone could have written it: refused, nothing changed. Export it again with this fazt, or pass --trust-unknown-signer if you know where it came from");
    };
    if signer == own {
        return Ok(format!("signed by this node ({signer})"));
    }
    if let Some((_, name)) = peers.iter().find(|(key, _)| *key == signer) {
        return Ok(format!("signed by peer {name} ({signer})"));
    }
    if trust_unknown {
        return Ok(format!(
            "signed by {signer}, not a trusted peer; imported because of --trust-unknown-signer"
        ));
    }
    bail!("the bundle is signed by node {signer}, which is not a trusted peer of this node: refused, nothing changed. If you trust that node, run `fazt peer trust {signer}` first (or pass --trust-unknown-signer to accept this one bundle)")
}

/// Reads the coverage part of a `fazt sync status --json` file.
fn read_coverage(path: &Path) -> Result<Coverage> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Status::from_json(&text)
        .and_then(|status| status.coverage())
        .map_err(|e| match e {
            StatusFileError::NotStatus(e) => anyhow!(
                "{} is not the output of `fazt sync status --json`: {e}",
                path.display()
            ),
            StatusFileError::BadSiteId(_) => anyhow!("{}: {e}", path.display()),
        })
}
