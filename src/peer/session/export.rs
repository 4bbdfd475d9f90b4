//! The export pipeline: what the peer lacks, read on a blocking thread as groups of whole
//! origin transactions, cut into pieces and sent within the window of the peer's
//! acknowledgements. Large values travel as content references; [`Offers`] remembers them,
//! and keeps their bytes in memory within a budget, until the peer has them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use fazt_proto::wire::{self, Changes, ContentRef, Heads, Message, NetChange};
use fazt_proto::Digest;
use fazt_sync::{Change, Coverage, Exported, Replica, Value};
use tokio::sync::{mpsc, watch};

use super::content::value_bytes;
use super::{lock, versions_lacking, Connect, Error, Limits, SharedRef};

/// Content offered to the peer: where it lives, and its bytes while the memory budget allows
/// (so serving it needs no second read and no second hash).
#[derive(Clone)]
pub(super) struct Offer {
    /// The group that offered it (0 until the piece is recorded).
    group: u64,
    pub(super) table: String,
    pub(super) pk: Vec<u8>,
    pub(super) cid: String,
    pub(super) bytes: Option<Arc<Vec<u8>>>,
}

/// Content offered as references, by digest, until the group that offered it is
/// acknowledged; and the memory budget for the bytes kept to serve it
/// ([`Limits::keep_offered_bytes`]). Offering, recording, serving and dropping go through
/// its methods only, so every kept byte is counted once and given back once.
pub(super) struct Offers {
    by_digest: Mutex<HashMap<Digest, Offer>>,
    /// Bytes of offered content kept in memory, at most `budget` (counted without the lock:
    /// the export thread reserves while the session serves and drops).
    kept: AtomicUsize,
    budget: usize,
}

impl Offers {
    pub(super) fn new(budget: usize) -> Offers {
        Offers {
            by_digest: Mutex::new(HashMap::new()),
            kept: AtomicUsize::new(0),
            budget,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Offer>> {
        self.by_digest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `bytes`, to keep for serving if the budget allows (on the export thread).
    fn keep(&self, bytes: Vec<u8>) -> Option<Arc<Vec<u8>>> {
        let len = bytes.len();
        if self.kept.fetch_add(len, Ordering::Relaxed) + len <= self.budget {
            Some(Arc::new(bytes))
        } else {
            self.kept.fetch_sub(len, Ordering::Relaxed);
            None
        }
    }

    fn release(&self, bytes: Option<Arc<Vec<u8>>>) {
        self.kept
            .fetch_sub(bytes.map_or(0, |b| b.len()), Ordering::Relaxed);
    }

    /// Records what a piece of group `group` offered. An older offer of the same digest is
    /// replaced, and its bytes go back to the budget.
    fn record(&self, group: u64, offered: Vec<(Digest, Offer)>) {
        let mut map = self.map();
        for (digest, mut offer) in offered {
            offer.group = group;
            if let Some(old) = map.insert(digest, offer) {
                self.release(old.bytes);
            }
        }
    }

    /// The peer acknowledged every group up to `groups`: their offers are dropped.
    pub(super) fn acknowledged(&self, groups: u64) {
        self.map().retain(|_, o| {
            let keep = o.group > groups;
            if !keep {
                self.release(o.bytes.take());
            }
            keep
        });
    }

    /// What was offered under `digest`, to serve it.
    pub(super) fn get(&self, digest: &Digest) -> Option<Offer> {
        self.map().get(digest).cloned()
    }

    /// `digest` was served: asked for once, its memory goes back to the budget for content
    /// not sent yet.
    pub(super) fn served(&self, digest: &Digest) {
        let freed = self.map().get_mut(digest).and_then(|o| o.bytes.take());
        self.release(freed);
    }

    /// Bytes kept in memory now.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.kept.load(Ordering::Relaxed)
    }
}

/// A piece of a group, made on a blocking thread and sent as soon as it is made, so the
/// peer can start fetching content while a large transaction is still being exported.
pub(super) struct Outgoing {
    message: Message,
    changes: u64,
    offered: Vec<(Digest, Offer)>,
    /// Set on a group's last piece: the versions the group completes.
    end: Option<Coverage>,
}

/// How long an exporter waits before relaying what this node got from its peers (not its
/// own writes): about the time a peer that got the same changes takes to apply them and say
/// so, which spares sending them to it again.
const RELAY_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// Exports what the peer lacks, then again whenever this node's holdings grew (`holdings`
/// moves only then: node-local commits wake no exporter). What the peer lacks is worked out
/// in memory, from the holdings and `peer_known`: a wake-up that finds the peer lacking
/// nothing (what woke it was what the peer sent, or what it told this side it holds
/// already) touches no database.
#[allow(clippy::too_many_arguments)]
pub(super) async fn export_loop(
    db: Replica,
    connect: Connect,
    shared: SharedRef,
    offers: Arc<Offers>,
    limits: Limits,
    out: mpsc::Sender<Message>,
    mut acked: watch::Receiver<u64>,
    mut holdings: watch::Receiver<Arc<Coverage>>,
    tick: mpsc::UnboundedSender<()>,
) -> Result<()> {
    let own = db.site_id();
    // The connection, while it is kept: closed after `export_idle` without a pass.
    let db = Arc::new(Mutex::new(Some(db)));
    let mut first = true;
    loop {
        let mut held = holdings.borrow_and_update().clone();
        let relaying = {
            let s = lock(&shared);
            let lacking = held.minus(&s.peer_known);
            !first && !lacking.0.is_empty() && lacking.0.keys().all(|site| *site != own)
        };
        if relaying {
            // Only changes this node got from peers: the peer may be getting them from
            // elsewhere too, and tell this side so within a round trip. Give it that.
            tokio::time::sleep(RELAY_PAUSE).await;
            held = holdings.borrow_and_update().clone();
        }
        first = false;
        let have = {
            let mut s = lock(&shared);
            s.stats.export_passes += 1;
            let lacking = versions_lacking(&held, &s.peer_known);
            tracing::debug!(lacking, "export pass");
            if lacking == 0 {
                None
            } else {
                s.exporting = true;
                Some(s.peer_known.clone())
            }
        };
        let Some(have) = have else {
            wait_for_holdings(&mut holdings, &db, limits.export_idle).await?;
            continue;
        };
        let (piece_tx, mut piece_rx) = mpsc::channel::<Outgoing>(4);
        let export_db = db.clone();
        let export_connect = connect.clone();
        let export_offers = offers.clone();
        let export_limits = limits.clone();
        let export = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut slot = export_db.lock().unwrap_or_else(|e| e.into_inner());
            let db = match slot.take() {
                Some(db) => slot.insert(db),
                None => slot.insert(export_connect.open()?),
            };
            // Tables registered and origins learned by other connections since the last pass.
            db.refresh()?;
            export_pass(&db, &have, &piece_tx, &export_offers, &export_limits)?;
            Ok(())
        });
        let mut in_group = false;
        while let Some(piece) = piece_rx.recv().await {
            if !in_group {
                // Flow control: at most `window` groups ahead of the peer's acknowledgements.
                let sent = lock(&shared).groups_sent;
                acked
                    .wait_for(|a| sent.saturating_sub(*a) < limits.window)
                    .await
                    .map_err(|_| Error::Cancelled)?;
                // A whole group in one piece that the peer said it holds since it was read
                // (it got it another way, and told this side) is not sent.
                let held = piece
                    .end
                    .as_ref()
                    .is_some_and(|covers| covers.minus(&lock(&shared).peer_known).0.is_empty());
                if held {
                    tracing::debug!("the peer holds the group already: not sent");
                    for (_, offer) in piece.offered {
                        offers.release(offer.bytes);
                    }
                    continue;
                }
                in_group = true;
            }
            let number = {
                let mut s = lock(&shared);
                s.stats.sent_changes += piece.changes;
                s.groups_sent + 1
            };
            offers.record(number, piece.offered);
            out.send(piece.message)
                .await
                .map_err(|_| Error::Cancelled)?;
            if let Some(covers) = piece.end {
                let mut s = lock(&shared);
                s.groups_sent += 1;
                s.peer_known.union(&covers);
                // The peer takes what it receives as held by this side.
                s.told.union(&covers);
                tracing::debug!(group = s.groups_sent, "sent a group");
                in_group = false;
            }
        }
        export.await??;
        lock(&shared).exporting = false;
        let _ = tick.send(());
        wait_for_holdings(&mut holdings, &db, limits.export_idle).await?;
    }
}

/// Waits until this node's holdings move; if that takes longer than `idle`, closes the
/// exporter's connection meanwhile (on a blocking thread), and the next pass opens another.
async fn wait_for_holdings(
    holdings: &mut watch::Receiver<Arc<Coverage>>,
    db: &Arc<Mutex<Option<Replica>>>,
    idle: std::time::Duration,
) -> Result<()> {
    let stopped = |_| anyhow!("this node's holdings stopped");
    if let Ok(woken) = tokio::time::timeout(idle, holdings.changed()).await {
        return woken.map_err(stopped);
    }
    let db = db.clone();
    tokio::task::spawn_blocking(move || drop(db.lock().unwrap_or_else(|e| e.into_inner()).take()))
        .await?;
    holdings.changed().await.map_err(stopped)
}

/// Exports everything `have` lacks as groups of pieces (blocking).
fn export_pass(
    db: &Replica,
    have: &Coverage,
    pieces: &mpsc::Sender<Outgoing>,
    offers: &Offers,
    limits: &Limits,
) -> Result<(), Error> {
    let mut batch: Vec<NetChange> = Vec::new();
    let mut offered = Vec::new();
    let mut batch_bytes = 0usize;
    let mut ref_bytes = 0usize;
    let send = |piece: Outgoing| pieces.blocking_send(piece).map_err(|_| Error::Cancelled);
    db.export_groups(have, limits.group_changes, |item| {
        match item {
            Exported::Change(c) => {
                let (net, size) = to_net(c, &mut offered, offers);
                batch_bytes += size;
                // A piece also ends after a few MiB of referenced content, so the receiver
                // starts fetching while the rest of a large deploy is still being read.
                ref_bytes += net.content.as_ref().map_or(0, |r| r.len as usize);
                batch.push(net);
                if batch_bytes >= limits.message_bytes || ref_bytes >= limits.piece_content_bytes {
                    ref_bytes = 0;
                    let changes = std::mem::take(&mut batch);
                    send(Outgoing {
                        changes: changes.len() as u64,
                        message: Message::Changes(Changes {
                            changes,
                            complete: None,
                        }),
                        offered: std::mem::take(&mut offered),
                        end: None,
                    })?;
                    batch_bytes = 0;
                }
            }
            Exported::Group(covers) => {
                let changes = std::mem::take(&mut batch);
                send(Outgoing {
                    changes: changes.len() as u64,
                    message: Message::Changes(Changes {
                        changes,
                        complete: Some(Heads::from(&covers)),
                    }),
                    offered: std::mem::take(&mut offered),
                    end: Some(covers),
                })?;
                batch_bytes = 0;
                ref_bytes = 0;
            }
        }
        Ok::<(), Error>(())
    })?;
    Ok(())
}

/// A change for the wire: large blobs and texts become content references, offered in
/// `offered` (their bytes kept if `offers`' budget allows). Returns its rough size.
pub(super) fn to_net(
    c: Change,
    offered: &mut Vec<(Digest, Offer)>,
    offers: &Offers,
) -> (NetChange, usize) {
    let base = 48 + c.pk.len() + c.table.len() + c.cid.len();
    let len = match &c.val {
        Value::Blob(b) => b.len(),
        Value::Text(t) => t.len(),
        _ => 0,
    };
    if len < wire::CONTENT_MIN {
        return (
            NetChange {
                change: c.to_wire(),
                content: None,
            },
            base + len.max(8),
        );
    }
    let text = matches!(c.val, Value::Text(_));
    let mut change = c.to_wire();
    change.val = fazt_proto::change::WireValue::Null;
    let Change {
        table,
        pk,
        cid,
        val,
        ..
    } = c;
    let bytes = value_bytes(val).unwrap_or_default();
    let digest = Digest::of(&bytes);
    let bytes = offers.keep(bytes);
    offered.push((
        digest,
        Offer {
            group: 0,
            table,
            pk,
            cid,
            bytes,
        },
    ));
    let content = Some(ContentRef {
        digest,
        len: len as u64,
        text,
    });
    (NetChange { change, content }, base + 40)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::session::tests::{node, put_blob};
    use fazt_sync::{CausalLength, ColVersion, DbVersion, Seq, SiteId};
    #[test]
    fn large_values_become_content_references_and_small_ones_stay_inline() {
        let change = |val: Value| Change {
            table: "blobs".into(),
            pk: vec![1, 2, 3],
            cid: "data".into(),
            val,
            col_version: ColVersion(1),
            db_version: DbVersion(1),
            site_id: SiteId([1; 16]),
            cl: CausalLength(1),
            seq: Seq(0),
        };
        let offers = Offers::new(Limits::default().keep_offered_bytes);
        let mut offered = Vec::new();
        let small = vec![5u8; wire::CONTENT_MIN - 1];
        let (net, _) = to_net(change(Value::Blob(small.clone())), &mut offered, &offers);
        assert!(net.content.is_none());
        assert_eq!(
            Change::from_wire(net.change).val,
            Value::Blob(small),
            "inline"
        );
        assert!(offered.is_empty());

        let big = vec![6u8; wire::CONTENT_MIN];
        let (net, _) = to_net(change(Value::Blob(big.clone())), &mut offered, &offers);
        let r = net.content.expect("a reference");
        assert_eq!(r.digest, Digest::of(&big));
        assert_eq!((r.len, r.text), (big.len() as u64, false));
        assert_eq!(net.change.val, fazt_proto::change::WireValue::Null);
        let text = "x".repeat(wire::CONTENT_MIN);
        let (net, _) = to_net(change(Value::Text(text.clone())), &mut offered, &offers);
        assert!(net.content.unwrap().text);
        assert_eq!(offered.len(), 2);
        assert_eq!(offered[0].1.bytes.as_deref(), Some(&big));
        assert_eq!(offers.kept(), big.len() + text.len());
    }

    fn blob_change(pk: u8, len: usize) -> Change {
        Change {
            table: "blobs".into(),
            pk: vec![pk],
            cid: "data".into(),
            val: Value::Blob(vec![pk; len]),
            col_version: ColVersion(1),
            db_version: DbVersion(1),
            site_id: SiteId([1; 16]),
            cl: CausalLength(1),
            seq: Seq(0),
        }
    }

    #[test]
    fn offered_content_beyond_the_memory_budget_is_read_again_not_kept() {
        // A budget with 10 bytes left once the first value is kept.
        let offers = Offers::new(2048 + 10);
        let mut offered = Vec::new();
        let (_, _) = to_net(blob_change(1, 2048), &mut offered, &offers);
        assert!(offered[0].1.bytes.is_some());
        assert_eq!(offers.kept(), 2048);
        let (net, _) = to_net(blob_change(2, 2048), &mut offered, &offers);
        assert!(net.content.is_some());
        assert!(offered[1].1.bytes.is_none());
        assert_eq!(offers.kept(), 2048);
    }

    #[test]
    fn kept_bytes_go_back_to_the_budget_when_served_replaced_or_acknowledged() {
        let offers = Offers::new(1 << 20);
        let offer = |pk: u8, len: usize| {
            let mut offered = Vec::new();
            to_net(blob_change(pk, len), &mut offered, &offers);
            offered
        };
        let (first, second, third) = (offer(1, 2000), offer(2, 3000), offer(3, 4000));
        let (one, two, three) = (first[0].0, second[0].0, third[0].0);
        offers.record(1, first);
        offers.record(1, second);
        offers.record(2, third);
        assert_eq!(offers.kept(), 9000);
        // Served once: the bytes go, the offer stays (it is read again if asked again).
        offers.served(&two);
        assert_eq!(offers.kept(), 6000);
        assert!(offers.get(&two).is_some_and(|o| o.bytes.is_none()));
        // The same content offered again by a later group replaces the older offer.
        offers.record(2, offer(1, 2000));
        assert_eq!(offers.kept(), 6000);
        // Group 1 acknowledged: its offers go; group 2's stay, bytes and all.
        offers.acknowledged(1);
        assert!(offers.get(&two).is_none());
        assert!(offers.get(&one).is_some_and(|o| o.bytes.is_some()));
        assert_eq!(offers.kept(), 6000);
        offers.acknowledged(2);
        assert!(offers.get(&one).is_none() && offers.get(&three).is_none());
        assert_eq!(offers.kept(), 0);
    }

    #[test]
    fn an_export_whose_session_is_gone_is_cancelled_not_an_engine_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = node(dir.path(), "a.db");
        put_blob(&a.0, &[7; 100]);
        let db = crate::db::open_existing(&a.0).unwrap();
        let (pieces, gone) = mpsc::channel(1);
        drop(gone);
        let offers = Offers::new(Limits::default().keep_offered_bytes);
        let err = export_pass(
            &db,
            &Coverage::default(),
            &pieces,
            &offers,
            &Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err:?}");
    }
}
