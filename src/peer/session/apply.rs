//! The apply loop: a peer's groups as they arrive, their content fetched
//! ([`super::content`]), each group applied in one transaction and acknowledged.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use fazt_proto::wire::NetChange;
use fazt_proto::{Digest, NodeId};
use fazt_sync::{ApplyReport, Batch, Change, Coverage, DbVersion, Replica, Value};
use tokio::sync::mpsc;

use super::content::{local_content, ApplyDb, Fetched, Fetcher, Wanted};
use super::{lock, Announcer, Error, Holdings, Node, SharedRef};

/// One Changes message, handed to the applier as it arrives; `covers` is set on a group's
/// last one.
pub(super) struct Incoming {
    pub(super) changes: Vec<NetChange>,
    pub(super) covers: Option<Coverage>,
}

/// Applies the peer's groups in the order they arrive, each once its content is complete;
/// right after each commits, grows this node's [`Holdings`] with what it now holds (every
/// session then tells its peer) and acknowledges it with what is new ([`Announcer`]).
#[allow(clippy::too_many_arguments)]
pub(super) async fn apply_loop(
    db: ApplyDb,
    peer: NodeId,
    node: Node,
    shared: SharedRef,
    mut fetcher: Fetcher,
    holdings: Holdings,
    announcer: Announcer,
    mut groups: mpsc::UnboundedReceiver<Incoming>,
    tick: mpsc::UnboundedSender<()>,
) -> Result<()> {
    // `db` has automatic checkpoints off (see `Connect::applier`).
    while let Some(first) = groups.recv().await {
        let mut wanted = Wanted::default();
        let mut changes: Vec<NetChange> = Vec::new();
        let mut next = Some(first);
        let covers = loop {
            let part = match next.take() {
                Some(p) => p,
                None => groups.recv().await.ok_or(Error::Cancelled)?,
            };
            // Ask for this part's content now; it arrives while later parts do.
            fetcher.want(&db, &mut wanted, &part.changes).await?;
            changes.extend(part.changes);
            if let Some(covers) = part.covers {
                break covers;
            }
        };
        let received = fetcher.receive(&db, &shared, wanted).await?;
        tracing::debug!(fetched = received.len(), "a group's content is complete");

        let sender_clock = lock(&shared).peer_clock;
        let apply_db = db.clone();
        let (applied, mine) = tokio::task::spawn_blocking(move || {
            let mut db = apply_db.lock().unwrap_or_else(|e| e.into_inner());
            apply_group(&mut db, peer, node, changes, received, covers, sender_clock)
        })
        .await??;
        // Only now, committed, is it true that this node holds it; the peer hears of it with
        // the count, once (every other session hears of it from its announcer).
        announcer
            .announce(&holdings, || {
                holdings.grow(&mine);
                let mut s = lock(&shared);
                s.groups_applied += 1;
                s.stats.duplicates += applied.already_seen as u64;
            })
            .await?;
        tracing::debug!(
            applied = applied.applied,
            transactions = applied.transactions,
            already_seen = applied.already_seen,
            "applied a group"
        );
        let _ = tick.send(());
    }
    Ok(())
}

/// Applies one group (blocking): its changes with their content put back in, in one
/// transaction with the coverage it completes, deleting the staged content it used.
/// Returns what was applied and what this node now holds.
fn apply_group(
    db: &mut Replica,
    peer: NodeId,
    node: Node,
    nets: Vec<NetChange>,
    mut received: Fetched,
    covers: Coverage,
    sender_clock: DbVersion,
) -> Result<(ApplyReport, Coverage)> {
    let mut used = Vec::new();
    let mut remaining_uses: HashMap<Digest, usize> = HashMap::new();
    for r in nets.iter().filter_map(|n| n.content.as_ref()) {
        *remaining_uses.entry(r.digest).or_insert(0) += 1;
    }
    let mut changes = Vec::with_capacity(nets.len());
    for net in nets {
        let mut change = Change::from_wire(net.change);
        if let Some(r) = net.content {
            let uses = remaining_uses.entry(r.digest).or_insert(0);
            *uses = uses.saturating_sub(1);
            let bytes = match (received.get(&r.digest), *uses) {
                // The last cell that needs these bytes takes them without a copy.
                (Some(_), 0) => {
                    let b = received.remove(&r.digest).unwrap_or_default();
                    Arc::try_unwrap(b).unwrap_or_else(|shared| shared.as_ref().clone())
                }
                (Some(b), _) => b.as_ref().clone(),
                (None, _) => local_content(db, &change.table, &change.pk, &change.cid, &r.digest)?
                    .ok_or_else(|| {
                        anyhow!("content {} vanished before it was applied", r.digest)
                    })?,
            };
            change.val = if r.text {
                Value::Text(
                    String::from_utf8(bytes)
                        .map_err(|_| anyhow!("the peer sent text content that is not UTF-8"))?,
                )
            } else {
                Value::Blob(bytes)
            };
            used.push(r.digest);
        }
        changes.push(change);
    }
    drop(received);
    // `fazt peer remove` takes effect at once, even on a session already open.
    if !(node.trusts)(db, &peer)? {
        bail!("this node no longer trusts the peer (it was removed)");
    }
    // Staged copies go in the same transaction as the cells they became.
    let report = db.apply_then(
        &Batch {
            changes,
            covers,
            sender_clock,
        },
        |tx| {
            // Only content the group used can be staged; a group without any (e.g. one this
            // node held already, whose merge then writes nothing) touches nothing here.
            if used.is_empty() {
                return Ok(());
            }
            let mut delete = tx.prepare_cached("DELETE FROM peer_content WHERE digest = ?1")?;
            for digest in &used {
                delete.execute([&digest.as_bytes()[..]])?;
            }
            Ok(())
        },
    )?;
    // E.g. blobs a peer deleted that this node still references go back, and the re-insert
    // replicates (hosting::gc).
    (node.after_apply)(db)?;
    Ok((report, db.coverage()?))
}
