//! Content that travels by reference: serving it (`Want` → `Content`) from what the export
//! offered, and fetching what a peer's groups reference and this node lacks — verified
//! against its digest, and kept in the node-local `peer_content` table as it arrives once a
//! transfer lasts, so a cut transfer resumes instead of starting over.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use fazt_proto::wire::{self, Content, Message, NetChange};
use fazt_proto::Digest;
use fazt_sync::{Replica, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::export::{Offer, Offers};
use super::{lock, Connect, Error, Limits, SharedRef};

/// The bytes of a blob or text value.
pub(super) fn value_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::Blob(b) => Some(b),
        Value::Text(t) => Some(t.into_bytes()),
        _ => None,
    }
}

/// Answers Want messages with the content this side offered. Content no longer kept in
/// memory is read on a connection of its own, opened on the first Want that needs it and
/// closed once no Want came for `idle`: most sessions serve no content, or only now and then,
/// and an idle connection holds its page cache and schema for nothing.
pub(super) async fn serve_content(
    connect: Connect,
    idle: Duration,
    shared: SharedRef,
    offers: Arc<Offers>,
    out: mpsc::Sender<Message>,
    mut wants: mpsc::UnboundedReceiver<Vec<Digest>>,
) -> Result<()> {
    let mut db: Option<Replica> = None;
    loop {
        let digests = match db {
            None => wants.recv().await,
            Some(_) => match tokio::time::timeout(idle, wants.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    // Dropped on a blocking thread: closing a connection is SQLite work.
                    let idle_db = db.take();
                    tokio::task::spawn_blocking(move || drop(idle_db)).await?;
                    continue;
                }
            },
        };
        let Some(digests) = digests else { break };
        for digest in digests {
            let bytes = match offers.get(&digest) {
                Some(Offer {
                    bytes: Some(bytes), ..
                }) => Some(bytes),
                Some(Offer { table, pk, cid, .. }) => {
                    let (opened, connect) = (db.take(), connect.clone());
                    let (conn, bytes) = tokio::task::spawn_blocking(
                        move || -> Result<(Replica, Option<Arc<Vec<u8>>>)> {
                            let conn = match opened {
                                Some(conn) => conn,
                                None => connect.open()?,
                            };
                            // Read again; the value may have changed since it was offered.
                            let bytes = conn
                                .cell(&table, &pk, &cid)?
                                .and_then(value_bytes)
                                .filter(|b| digest.matches(b))
                                .map(Arc::new);
                            Ok((conn, bytes))
                        },
                    )
                    .await??;
                    db = Some(conn);
                    bytes
                }
                None => None,
            };
            let Some(bytes) = bytes else {
                out.send(Message::Content(Content {
                    digest,
                    gone: true,
                    total: 0,
                    offset: 0,
                    data: Vec::new(),
                }))
                .await
                .map_err(|_| Error::Cancelled)?;
                continue;
            };
            let total = bytes.len() as u64;
            let mut offset = 0usize;
            loop {
                let end = (offset + wire::CONTENT_CHUNK).min(bytes.len());
                let data = bytes[offset..end].to_vec();
                out.send(Message::Content(Content {
                    digest,
                    gone: false,
                    total,
                    offset: offset as u64,
                    data,
                }))
                .await
                .map_err(|_| Error::Cancelled)?;
                offset = end;
                if offset >= bytes.len() {
                    break;
                }
            }
            lock(&shared).stats.sent_content += total;
            offers.served(&digest);
        }
    }
    if let Some(db) = db {
        tokio::task::spawn_blocking(move || drop(db)).await?;
    }
    Ok(())
}

/// The applying connection, shared with the blocking tasks that look up and stage content.
pub(super) type ApplyDb = Arc<Mutex<Replica>>;

/// Content fetched for a group, by digest.
pub(super) type Fetched = HashMap<Digest, Arc<Vec<u8>>>;

/// Fetches the content a peer's groups reference and this node lacks.
pub(super) struct Fetcher {
    out: mpsc::Sender<Message>,
    content: mpsc::UnboundedReceiver<Content>,
    /// Content arriving in chunks: digest -> bytes so far.
    partial: HashMap<Digest, Vec<u8>>,
    want_batch: usize,
    stage_bytes: usize,
    stage_after: Duration,
    now: fn() -> i64,
}

/// One group's content: asked for as the group's parts arrive, then received whole.
#[derive(Default)]
pub(super) struct Wanted {
    /// Content fetched for this group...
    received: Fetched,
    /// ... and what of it is not kept in `peer_content` yet.
    unstaged: Vec<(Digest, Arc<Vec<u8>>)>,
    unstaged_bytes: usize,
    missing: HashSet<Digest>,
    /// When this group's first content was asked for.
    since: Option<Instant>,
    staging: Vec<JoinHandle<Result<()>>>,
}

impl Fetcher {
    pub(super) fn new(
        out: mpsc::Sender<Message>,
        content: mpsc::UnboundedReceiver<Content>,
        limits: &Limits,
        now: fn() -> i64,
    ) -> Fetcher {
        Fetcher {
            out,
            content,
            partial: HashMap::new(),
            want_batch: limits.want_batch,
            stage_bytes: limits.stage_bytes,
            stage_after: limits.stage_after,
            now,
        }
    }

    /// Asks for the content `part` references that this node holds neither in the cell nor
    /// in `peer_content`, and that `group` has not asked for yet: it arrives while later
    /// parts do.
    pub(super) async fn want(
        &self,
        db: &ApplyDb,
        group: &mut Wanted,
        part: &[NetChange],
    ) -> Result<()> {
        let cells: Vec<(String, Vec<u8>, String, Digest)> = part
            .iter()
            .filter_map(|c| c.content.as_ref().map(|r| (c, r.digest)))
            .filter(|(_, d)| !group.missing.contains(d))
            .map(|(c, d)| {
                (
                    c.change.table.clone(),
                    c.change.pk.clone(),
                    c.change.cid.clone(),
                    d,
                )
            })
            .collect();
        if cells.is_empty() {
            return Ok(());
        }
        let check_db = db.clone();
        let lacking = tokio::task::spawn_blocking(move || -> Result<HashSet<Digest>> {
            let db = check_db.lock().unwrap_or_else(|e| e.into_inner());
            let mut lacking = HashSet::new();
            for (table, pk, cid, digest) in &cells {
                if local_content(&db, table, pk, cid, digest)?.is_none() {
                    lacking.insert(*digest);
                }
            }
            Ok(lacking)
        })
        .await??;
        let list: Vec<Digest> = lacking
            .into_iter()
            .filter(|d| group.missing.insert(*d))
            .collect();
        if !list.is_empty() {
            group.since.get_or_insert_with(Instant::now);
        }
        for chunk in list.chunks(self.want_batch) {
            self.out
                .send(Message::Want(chunk.to_vec()))
                .await
                .map_err(|_| Error::Cancelled)?;
        }
        Ok(())
    }

    /// Receives everything `group` asked for, checking each piece of content against its
    /// digest; a peer that sends content out of order, beyond its length, or says it is gone
    /// ends the session. Returns the content by digest once all of it has arrived and what
    /// was being kept in `peer_content` is written.
    pub(super) async fn receive(
        &mut self,
        db: &ApplyDb,
        shared: &SharedRef,
        mut group: Wanted,
    ) -> Result<Fetched> {
        while !group.missing.is_empty() {
            let c = self.content.recv().await.ok_or(Error::Cancelled)?;
            if !group.missing.contains(&c.digest) {
                continue;
            }
            if c.gone {
                bail!("content changed on the peer during the transfer; the next sync picks up the new version");
            }
            let buf = self.partial.entry(c.digest).or_default();
            if c.offset != buf.len() as u64 {
                bail!("the peer sent content out of order");
            }
            buf.extend_from_slice(&c.data);
            if buf.len() as u64 == c.total {
                let bytes = Arc::new(self.partial.remove(&c.digest).unwrap_or_default());
                if !c.digest.matches(&bytes) {
                    bail!("the peer sent content that does not match its digest");
                }
                group.missing.remove(&c.digest);
                lock(shared).stats.received_content += bytes.len() as u64;
                group.unstaged_bytes += bytes.len();
                group.unstaged.push((c.digest, bytes.clone()));
                group.received.insert(c.digest, bytes);
                // A long transfer is kept as it arrives, in batches: cut off, it resumes
                // from here instead of fetching everything again.
                // Written in the background while more content arrives.
                let long = group.since.is_some_and(|t| t.elapsed() >= self.stage_after);
                if long && group.unstaged_bytes >= self.stage_bytes && !group.missing.is_empty() {
                    let batch = std::mem::take(&mut group.unstaged);
                    group.unstaged_bytes = 0;
                    let store_db = db.clone();
                    let now = self.now;
                    group.staging.push(tokio::task::spawn_blocking(move || {
                        stage_content(&store_db, &batch, now())
                    }));
                }
            }
        }
        for task in group.staging {
            task.await??;
        }
        Ok(group.received)
    }
}

/// Keeps fetched content in `peer_content`, in one transaction, as received at `now`.
fn stage_content(db: &Mutex<Replica>, batch: &[(Digest, Arc<Vec<u8>>)], now: i64) -> Result<()> {
    let db = db.lock().unwrap_or_else(|e| e.into_inner());
    stage_rows(&db, batch, now)
}

fn stage_rows(db: &Replica, batch: &[(Digest, Arc<Vec<u8>>)], now: i64) -> Result<()> {
    // Staged content is a cache of what the peer still holds: a power cut that loses it only
    // means fetching it again, so its commits skip the fsync (the group's own commit, with
    // full durability, syncs the log they share).
    db.conn().pragma_update(None, "synchronous", "OFF")?;
    let staged = stage_in_transaction(db, batch, now);
    db.conn().pragma_update(None, "synchronous", "FULL")?;
    staged
}

fn stage_in_transaction(db: &Replica, batch: &[(Digest, Arc<Vec<u8>>)], now: i64) -> Result<()> {
    let tx = db.conn().unchecked_transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO peer_content (digest, data, received_at) VALUES (?1, ?2, ?3)",
        )?;
        for (digest, bytes) in batch {
            insert.execute(rusqlite::params![
                &digest.as_bytes()[..],
                bytes.as_slice(),
                now
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Bytes with `digest` this node already holds for a cell: the cell itself, or content
/// fetched earlier and not applied yet.
pub(super) fn local_content(
    db: &Replica,
    table: &str,
    pk: &[u8],
    cid: &str,
    digest: &Digest,
) -> Result<Option<Vec<u8>>> {
    if let Some(b) = db.cell(table, pk, cid)?.and_then(value_bytes) {
        if digest.matches(&b) {
            return Ok(Some(b));
        }
    }
    use rusqlite::OptionalExtension;
    Ok(db
        .conn()
        .query_row(
            "SELECT data FROM peer_content WHERE digest = ?1",
            [&digest.as_bytes()[..]],
            |r| r.get(0),
        )
        .optional()?)
}
