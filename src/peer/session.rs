//! One replication session with a peer over one bidirectional stream.
//!
//! Both sides run the same code (docs/sync-protocol.md):
//! 1. each sends `Hello` with the versions it holds per origin;
//! 2. each exports what the other lacks as groups of whole origin transactions, at most
//!    [`WINDOW`] groups ahead of the other's `Applied` acknowledgements;
//! 3. large blobs travel as content references; the receiver fetches (`Want`/`Content`)
//!    only the content it does not hold, keeps it in `peer_content` as it arrives once the
//!    transfer has lasted a second, and applies each group in one transaction once its
//!    content is complete;
//! 4. live: every local commit (noticed by [`crate::peer::watch`]) starts another export.
//!
//! SQLite work runs on blocking threads, each task with its own connection, so a slow
//! export never holds up applying or serving content.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use fazt_proto::wire::{self, Changes, Content, ContentRef, Heads, Hello, Message, NetChange};
use fazt_proto::NodeId;
use fazt_sync::{Batch, Change, Coverage, Exported, Replica, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::error::{Closed, Stage, Violation};
use super::frame::read_message;
use super::Error;

/// Changes per group (a group never splits an origin transaction, so it may hold more).
const GROUP_CHANGES: usize = 2_000;
/// A Changes message is cut after about this many bytes.
const MESSAGE_BYTES: usize = 256 * 1024;
/// Offered content kept in memory for serving, at most this many bytes per session.
const KEEP_OFFERED_BYTES: usize = 64 << 20;
/// A piece of a group ends after this much referenced content.
const PIECE_CONTENT_BYTES: usize = 4 << 20;
/// Groups sent ahead of the peer's acknowledgements.
const WINDOW: u64 = 4;
/// Fetched content is kept in `peer_content` in batches of about this many bytes...
const STAGE_BYTES: usize = 16 << 20;
/// ... once a group's content has been arriving for this long. A faster transfer is applied
/// straight from memory: writing it twice would slow it more than fetching it again after
/// a cut would cost. `FAZT_STAGE_AFTER_MS` overrides it (tests cut transfers on loopback).
const STAGE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

fn stage_after() -> std::time::Duration {
    static AFTER: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *AFTER.get_or_init(|| {
        std::env::var("FAZT_STAGE_AFTER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(STAGE_AFTER, std::time::Duration::from_millis)
    })
}
/// Digests per Want message.
const WANT_BATCH: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Keep pushing local commits until the connection ends.
    Live,
    /// Return once both sides hold the same versions.
    Once,
}

/// What moved during a session.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub sent_changes: u64,
    pub received_changes: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub sent_content: u64,
    pub received_content: u64,
    /// Origin versions this node holds that the peer does not (as last reported).
    pub lag: u64,
}

/// A session's settings.
pub struct Session {
    pub db_path: PathBuf,
    pub own: NodeId,
    pub peer: NodeId,
    pub peer_name: String,
    pub mode: Mode,
    /// Ticks on every commit to the database by anyone.
    pub changed: watch::Receiver<u64>,
    /// Receives the session's figures as they change.
    pub progress: Option<watch::Sender<Stats>>,
}

/// The highest version in `heads`: for an honest node's own heads, its Lamport clock (its
/// own coverage is 1..=clock, and it holds nothing beyond).
fn clock_of(heads: &Coverage) -> i64 {
    heads
        .0
        .values()
        .filter_map(|r| r.ranges().last().map(|&(_, end)| end))
        .max()
        .unwrap_or(0)
}

/// Versions in `a` that `b` lacks.
fn versions_lacking(a: &Coverage, b: &Coverage) -> u64 {
    a.minus(b)
        .0
        .values()
        .flat_map(|r| r.ranges().iter())
        .fold(0u64, |n, &(s, e)| {
            n.saturating_add(u64::try_from(e.saturating_sub(s).saturating_add(1)).unwrap_or(0))
        })
}

/// A group received whole, waiting to be applied.
/// One Changes message, handed to the applier as it arrives; `covers` is set on a group's
/// last one.
struct Incoming {
    changes: Vec<NetChange>,
    covers: Option<Coverage>,
}

/// State shared by the session's tasks.
#[derive(Default)]
struct Shared {
    /// What the peer holds, as far as this side knows: its Hello, its acknowledgements,
    /// what it sent, and what was sent to it.
    peer_known: Coverage,
    /// What the peer said it holds (Hello and Applied), plus what it sent.
    their_heads: Coverage,
    /// What this side holds, as of its last export or apply.
    mine: Coverage,
    /// The peer's Lamport clock as it declares it: the highest version in its Hello and
    /// Applied heads (its own coverage ends there). Covers it sends are believed up to it.
    peer_clock: i64,
    stats: Stats,
    /// Content offered as references, by digest, until the group is acknowledged.
    offered: HashMap<[u8; 32], Offer>,
    /// Bytes of offered content kept in memory (see [`KEEP_OFFERED_BYTES`]).
    kept: Arc<AtomicUsize>,
    groups_sent: u64,
    groups_acked: u64,
    exporting: bool,
    groups_received: u64,
    /// Part of a group has arrived, not its end.
    mid_group: bool,
    groups_applied: u64,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(shared: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    // A panicking task is reported through its join handle; the state is still usable.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl Session {
    /// Runs the session until the stream ends (Live) or both sides hold the same versions
    /// (Once). `recv`/`send` are the two halves of one stream.
    pub async fn run<R, W>(self, mut recv: R, send: W, first: Option<Hello>) -> Result<Stats, Error>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let path = self.db_path.clone();
        let (exporter_db, applier_db, content_db) =
            tokio::task::spawn_blocking(move || -> Result<_> {
                Ok((
                    crate::db::open_existing(&path)?,
                    crate::db::open_existing(&path)?,
                    crate::db::open_existing(&path)?,
                ))
            })
            .await
            .map_err(anyhow::Error::from)??;
        let mine = applier_db.coverage()?;
        let shared: SharedRef = Arc::new(Mutex::new(Shared {
            mine: mine.clone(),
            ..Shared::default()
        }));

        // Everything this side sends goes through one writer task.
        let (out_tx, out_rx) = mpsc::channel::<Message>(16);
        let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<anyhow::Error>();
        let (tick_tx, mut tick_rx) = mpsc::unbounded_channel::<()>();
        let writer = spawn_task(write_loop(send, out_rx, shared.clone()), fail_tx.clone());

        out_tx
            .send(Message::Hello(Hello {
                node: *self.own.as_bytes(),
                protocol: fazt_proto::PROTOCOL_VERSION,
                schema: crate::db::migrations::latest_version(),
                heads: Heads::from(&mine),
            }))
            .await
            .map_err(|_| self.error_closed(Closed::BeforeSending))?;
        let first = match first {
            Some(h) => Some((Message::Hello(h), 0)),
            None => read_message(&mut recv).await?,
        };
        if let Some((_, size)) = &first {
            lock(&shared).stats.received_bytes += *size as u64;
        }
        let hello = match first {
            Some((Message::Hello(h), _)) => h,
            Some((Message::Refuse(reason), _)) => {
                return Err(self.error_refused(Stage::Hello, reason))
            }
            Some(_) => return Err(self.error_protocol(Violation::FirstNotHello)),
            None => return Err(self.error_closed(Closed::BeforeHello)),
        };
        self.check_hello(&hello)?;
        {
            let mut s = lock(&shared);
            let theirs = Coverage::from(&hello.heads);
            s.peer_clock = s.peer_clock.max(clock_of(&theirs));
            s.peer_known = theirs.clone();
            s.their_heads = theirs;
        }

        let (acked_tx, acked_rx) = watch::channel(0u64);
        let (apply_tx, apply_rx) = mpsc::unbounded_channel::<Incoming>();
        let (want_tx, want_rx) = mpsc::unbounded_channel::<Vec<[u8; 32]>>();
        let (content_tx, content_rx) = mpsc::unbounded_channel::<Content>();

        let tasks = vec![
            writer,
            spawn_task(
                export_loop(
                    exporter_db,
                    shared.clone(),
                    out_tx.clone(),
                    acked_rx,
                    self.changed.clone(),
                    tick_tx.clone(),
                ),
                fail_tx.clone(),
            ),
            spawn_task(
                serve_content(content_db, shared.clone(), out_tx.clone(), want_rx),
                fail_tx.clone(),
            ),
            spawn_task(
                apply_loop(
                    applier_db,
                    self.peer,
                    shared.clone(),
                    out_tx.clone(),
                    apply_rx,
                    content_rx,
                    tick_tx.clone(),
                ),
                fail_tx.clone(),
            ),
        ];
        // Frames are read by their own task: a frame half-read when another event wins the
        // select below would otherwise be lost, and the stream would fall out of step.
        let (msg_tx, mut msg_rx) = mpsc::channel(16);
        let reader = tokio::spawn(async move {
            loop {
                let next = read_message(&mut recv).await;
                let end = !matches!(next, Ok(Some(_)));
                if msg_tx.send(next).await.is_err() || end {
                    return;
                }
            }
        });
        let result = self
            .receive(
                &mut msg_rx,
                &shared,
                &acked_tx,
                &apply_tx,
                &want_tx,
                &content_tx,
                &mut fail_rx,
                &mut tick_rx,
            )
            .await;
        reader.abort();
        for t in tasks {
            t.abort();
        }
        let stats = lock(&shared).stats.clone();
        result.map(|_| stats).map_err(Error::from)
    }

    fn error_refused(&self, during: Stage, reason: String) -> Error {
        Error::Refused {
            peer: self.peer_name.clone(),
            during,
            reason,
        }
    }

    fn error_closed(&self, when: Closed) -> Error {
        Error::Closed {
            peer: self.peer_name.clone(),
            when,
        }
    }

    fn error_protocol(&self, what: Violation) -> Error {
        Error::Protocol {
            peer: self.peer_name.clone(),
            what,
        }
    }

    fn check_hello(&self, hello: &Hello) -> Result<(), Error> {
        if hello.node != *self.peer.as_bytes() {
            return Err(self.error_protocol(Violation::NotWhoItAuthenticatedAs));
        }
        if hello.protocol != fazt_proto::PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                peer: self.peer_name.clone(),
                theirs: Some(hello.protocol),
            });
        }
        let schema = crate::db::migrations::latest_version();
        if hello.schema > schema {
            tracing::info!(
                peer = %self.peer_name,
                theirs = hello.schema,
                ours = schema,
                "peer has a newer schema: changes for tables this node lacks wait until it is upgraded"
            );
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn receive(
        &self,
        messages: &mut mpsc::Receiver<Result<Option<(Message, usize)>>>,
        shared: &SharedRef,
        acked_tx: &watch::Sender<u64>,
        apply_tx: &mpsc::UnboundedSender<Incoming>,
        want_tx: &mpsc::UnboundedSender<Vec<[u8; 32]>>,
        content_tx: &mpsc::UnboundedSender<Content>,
        fail_rx: &mut mpsc::UnboundedReceiver<anyhow::Error>,
        tick_rx: &mut mpsc::UnboundedReceiver<()>,
    ) -> Result<()> {
        loop {
            tokio::select! {
                msg = messages.recv() => {
                    let Some((msg, size)) = msg.unwrap_or(Ok(None))? else {
                        return match self.mode {
                            Mode::Live => Ok(()),
                            Mode::Once => Err(self.error_closed(Closed::BeforeConverged).into()),
                        };
                    };
                    lock(shared).stats.received_bytes += size as u64;
                    match msg {
                        Message::Changes(Changes { changes, complete }) => {
                            let covers = complete.map(|h| Coverage::from(&h));
                            {
                                let mut s = lock(shared);
                                s.stats.received_changes += changes.len() as u64;
                                s.mid_group = covers.is_none();
                                if let Some(covers) = &covers {
                                    s.groups_received += 1;
                                    s.peer_known.union(covers);
                                    s.their_heads.union(covers);
                                }
                            }
                            // Parts go to the applier at once, so it can fetch content while
                            // the rest of a large group is still arriving.
                            apply_tx.send(Incoming { changes, covers }).map_err(|_| anyhow!("applying stopped"))?;
                        }
                        Message::Applied { groups, heads } => {
                            let heads = Coverage::from(&heads);
                            {
                                let mut s = lock(shared);
                                s.peer_clock = s.peer_clock.max(clock_of(&heads));
                                s.peer_known.union(&heads);
                                s.their_heads.union(&heads);
                                let kept = s.kept.clone();
                                s.offered.retain(|_, o| {
                                    let keep = o.group > groups;
                                    if !keep {
                                        kept.fetch_sub(o.bytes.as_ref().map_or(0, |b| b.len()), Ordering::Relaxed);
                                    }
                                    keep
                                });
                                s.groups_acked = s.groups_acked.max(groups);
                                s.stats.lag = versions_lacking(&s.mine, &s.their_heads);
                            }
                            acked_tx.send_replace(groups);
                            if self.mode == Mode::Once && converged(shared) {
                                return Ok(());
                            }
                        }
                        Message::Want(digests) => want_tx.send(digests).map_err(|_| anyhow!("serving content stopped"))?,
                        Message::Content(c) => content_tx.send(c).map_err(|_| anyhow!("applying stopped"))?,
                        Message::Refuse(reason) => return Err(self.error_refused(Stage::Session, reason).into()),
                        Message::Hello(_) | Message::Join(_) | Message::Welcome { .. } => {
                            return Err(self.error_protocol(Violation::Unexpected(msg.name())).into())
                        }
                    }
                    self.report(shared);
                }
                Some(err) = fail_rx.recv() => return Err(err),
                Some(()) = tick_rx.recv() => {
                    self.report(shared);
                    if self.mode == Mode::Once && converged(shared) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Publishes the figures when they changed. Only then: the server writes them to the
    /// peers table, and that commit wakes the exporters, which report again.
    fn report(&self, shared: &SharedRef) {
        if let Some(progress) = &self.progress {
            let stats = lock(shared).stats.clone();
            progress.send_if_modified(|old| {
                let changed = *old != stats;
                *old = stats;
                changed
            });
        }
    }
}

/// Both sides hold the same versions and nothing is in flight either way.
fn converged(shared: &SharedRef) -> bool {
    let s = lock(shared);
    !s.exporting
        && !s.mid_group
        && s.groups_received == s.groups_applied
        && s.groups_acked >= s.groups_sent
        && s.mine == s.their_heads
}

fn spawn_task(
    fut: impl std::future::Future<Output = Result<()>> + Send + 'static,
    fail: mpsc::UnboundedSender<anyhow::Error>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = fut.await {
            let _ = fail.send(e);
        }
    })
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut send: W,
    mut rx: mpsc::Receiver<Message>,
    shared: SharedRef,
) -> Result<()> {
    while let Some(msg) = rx.recv().await {
        let frame = msg.encode();
        send.write_all(&frame)
            .await
            .context("writing to the peer")?;
        lock(&shared).stats.sent_bytes += frame.len() as u64;
    }
    send.shutdown().await.ok();
    Ok(())
}

/// A piece of a group, made on a blocking thread and sent as soon as it is made, so the
/// peer can start fetching content while a large transaction is still being exported.
struct Outgoing {
    message: Message,
    changes: u64,
    offered: Vec<([u8; 32], Offer)>,
    /// Set on a group's last piece: the versions the group completes.
    end: Option<Coverage>,
}

async fn export_loop(
    db: Replica,
    shared: SharedRef,
    out: mpsc::Sender<Message>,
    mut acked: watch::Receiver<u64>,
    mut changed: watch::Receiver<u64>,
    tick: mpsc::UnboundedSender<()>,
) -> Result<()> {
    let db = Arc::new(Mutex::new(db));
    loop {
        changed.borrow_and_update();
        let have = {
            let mut s = lock(&shared);
            s.exporting = true;
            s.peer_known.clone()
        };
        let (piece_tx, mut piece_rx) = mpsc::channel::<Outgoing>(4);
        let kept = lock(&shared).kept.clone();
        let export_db = db.clone();
        let export = tokio::task::spawn_blocking(move || -> Result<Coverage> {
            let mut db = export_db.lock().unwrap_or_else(|e| e.into_inner());
            // Tables registered and origins learned by other connections since the last pass.
            db.refresh()?;
            export_pass(&db, &have, &piece_tx, &kept)?;
            Ok(db.coverage()?)
        });
        let mut in_group = false;
        while let Some(piece) = piece_rx.recv().await {
            if !in_group {
                // Flow control: at most WINDOW groups ahead of the peer's acknowledgements.
                let sent = lock(&shared).groups_sent;
                acked
                    .wait_for(|a| sent.saturating_sub(*a) < WINDOW)
                    .await
                    .map_err(|_| Error::Cancelled)?;
                in_group = true;
            }
            {
                let mut s = lock(&shared);
                let number = s.groups_sent + 1;
                s.stats.sent_changes += piece.changes;
                for (digest, mut offer) in piece.offered {
                    offer.group = number;
                    if let Some(old) = s.offered.insert(digest, offer) {
                        s.kept
                            .fetch_sub(old.bytes.map_or(0, |b| b.len()), Ordering::Relaxed);
                    }
                }
            }
            out.send(piece.message)
                .await
                .map_err(|_| Error::Cancelled)?;
            if let Some(covers) = piece.end {
                let mut s = lock(&shared);
                s.groups_sent += 1;
                s.peer_known.union(&covers);
                tracing::debug!(group = s.groups_sent, "sent a group");
                in_group = false;
            }
        }
        let mine = export.await??;
        {
            let mut s = lock(&shared);
            s.mine = mine;
            s.exporting = false;
            s.stats.lag = versions_lacking(&s.mine, &s.their_heads);
        }
        let _ = tick.send(());
        changed
            .changed()
            .await
            .map_err(|_| anyhow!("the database watcher stopped"))?;
    }
}

/// Exports everything `have` lacks as groups of pieces (blocking).
fn export_pass(
    db: &Replica,
    have: &Coverage,
    pieces: &mpsc::Sender<Outgoing>,
    kept: &AtomicUsize,
) -> Result<(), Error> {
    let mut batch: Vec<NetChange> = Vec::new();
    let mut offered = Vec::new();
    let mut batch_bytes = 0usize;
    let mut ref_bytes = 0usize;
    let send = |piece: Outgoing| pieces.blocking_send(piece).map_err(|_| Error::Cancelled);
    db.export_groups(have, GROUP_CHANGES, |item| {
        match item {
            Exported::Change(c) => {
                let (net, size) = to_net(c, &mut offered, kept);
                batch_bytes += size;
                // A piece also ends after a few MiB of referenced content, so the receiver
                // starts fetching while the rest of a large deploy is still being read.
                ref_bytes += net.content.as_ref().map_or(0, |r| r.len as usize);
                batch.push(net);
                if batch_bytes >= MESSAGE_BYTES || ref_bytes >= PIECE_CONTENT_BYTES {
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

/// Content offered to the peer: where it lives, and its bytes while the memory budget allows
/// (so serving it needs no second read and no second hash).
#[derive(Clone)]
struct Offer {
    group: u64,
    table: String,
    pk: Vec<u8>,
    cid: String,
    bytes: Option<Arc<Vec<u8>>>,
}

/// A change for the wire: large blobs and texts become content references. Returns its
/// rough size.
fn to_net(
    c: Change,
    offered: &mut Vec<([u8; 32], Offer)>,
    kept: &AtomicUsize,
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
    change.val = fazt_proto::bundle::WireValue::Null;
    let Change {
        table,
        pk,
        cid,
        val,
        ..
    } = c;
    let bytes = value_bytes(val).unwrap_or_default();
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    let bytes = (kept.fetch_add(len, Ordering::Relaxed) + len <= KEEP_OFFERED_BYTES)
        .then(|| Arc::new(bytes));
    if bytes.is_none() {
        kept.fetch_sub(len, Ordering::Relaxed);
    }
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

/// The bytes of a blob or text value.
fn value_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::Blob(b) => Some(b),
        Value::Text(t) => Some(t.into_bytes()),
        _ => None,
    }
}

/// Answers Want messages with the content this side offered.
async fn serve_content(
    db: Replica,
    shared: SharedRef,
    out: mpsc::Sender<Message>,
    mut wants: mpsc::UnboundedReceiver<Vec<[u8; 32]>>,
) -> Result<()> {
    let db = Arc::new(Mutex::new(db));
    while let Some(digests) = wants.recv().await {
        for digest in digests {
            let offer = lock(&shared).offered.get(&digest).cloned();
            let bytes = match offer {
                Some(Offer {
                    bytes: Some(bytes), ..
                }) => Some(bytes),
                Some(Offer { table, pk, cid, .. }) => {
                    let db = db.clone();
                    tokio::task::spawn_blocking(move || -> Result<Option<Arc<Vec<u8>>>> {
                        let db = db.lock().unwrap_or_else(|e| e.into_inner());
                        // Read again; the value may have changed since it was offered.
                        Ok(db
                            .cell(&table, &pk, &cid)?
                            .and_then(value_bytes)
                            .filter(|b| <[u8; 32]>::from(Sha256::digest(b)) == digest)
                            .map(Arc::new))
                    })
                    .await??
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
            let mut s = lock(&shared);
            s.stats.sent_content += total;
            // Asked for once: the memory goes back to the budget for content not sent yet.
            let freed = s
                .offered
                .get_mut(&digest)
                .and_then(|o| o.bytes.take())
                .map_or(0, |b| b.len());
            s.kept.fetch_sub(freed, Ordering::Relaxed);
        }
    }
    Ok(())
}

async fn apply_loop(
    db: Replica,
    peer: NodeId,
    shared: SharedRef,
    out: mpsc::Sender<Message>,
    mut groups: mpsc::UnboundedReceiver<Incoming>,
    mut content: mpsc::UnboundedReceiver<Content>,
    tick: mpsc::UnboundedSender<()>,
) -> Result<()> {
    // Copying a large transfer from the WAL into the database file is left to the node's
    // other connections (SQLite checkpoints on their next commit), not done on the path
    // between receiving a group and acknowledging it.
    db.conn().pragma_update(None, "wal_autocheckpoint", 0)?;
    let db = Arc::new(Mutex::new(db));
    // Content arriving in chunks: digest -> bytes so far.
    let mut partial: HashMap<[u8; 32], Vec<u8>> = HashMap::new();
    while let Some(first) = groups.recv().await {
        // Content fetched for this group, and what of it is not kept in `peer_content` yet.
        let mut received: HashMap<[u8; 32], Arc<Vec<u8>>> = HashMap::new();
        let mut unstaged: Vec<([u8; 32], Arc<Vec<u8>>)> = Vec::new();
        let mut unstaged_bytes = 0usize;
        let mut missing: HashSet<[u8; 32]> = HashSet::new();
        // When this group's first content was asked for.
        let mut wanted_since: Option<std::time::Instant> = None;
        let mut staging = Vec::new();
        let mut changes: Vec<NetChange> = Vec::new();
        let mut next = Some(first);
        let covers = loop {
            let part = match next.take() {
                Some(p) => p,
                None => groups.recv().await.ok_or_else(|| Error::Cancelled)?,
            };
            // Ask for this part's content now; it arrives while later parts do.
            let cells: Vec<(String, Vec<u8>, String, [u8; 32])> = part
                .changes
                .iter()
                .filter_map(|c| c.content.as_ref().map(|r| (c, r.digest)))
                .filter(|(_, d)| !missing.contains(d))
                .map(|(c, d)| {
                    (
                        c.change.table.clone(),
                        c.change.pk.clone(),
                        c.change.cid.clone(),
                        d,
                    )
                })
                .collect();
            if !cells.is_empty() {
                let check_db = db.clone();
                let lacking = tokio::task::spawn_blocking(move || -> Result<HashSet<[u8; 32]>> {
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
                let list: Vec<[u8; 32]> =
                    lacking.into_iter().filter(|d| missing.insert(*d)).collect();
                if !list.is_empty() {
                    wanted_since.get_or_insert_with(std::time::Instant::now);
                }
                for chunk in list.chunks(WANT_BATCH) {
                    out.send(Message::Want(chunk.to_vec()))
                        .await
                        .map_err(|_| Error::Cancelled)?;
                }
            }
            changes.extend(part.changes);
            if let Some(covers) = part.covers {
                break covers;
            }
        };
        {
            while !missing.is_empty() {
                let c = content.recv().await.ok_or_else(|| Error::Cancelled)?;
                if !missing.contains(&c.digest) {
                    continue;
                }
                if c.gone {
                    bail!("content changed on the peer during the transfer; the next sync picks up the new version");
                }
                let buf = partial.entry(c.digest).or_default();
                if c.offset != buf.len() as u64 {
                    bail!("the peer sent content out of order");
                }
                buf.extend_from_slice(&c.data);
                if buf.len() as u64 == c.total {
                    let bytes = Arc::new(partial.remove(&c.digest).unwrap_or_default());
                    if <[u8; 32]>::from(Sha256::digest(bytes.as_slice())) != c.digest {
                        bail!("the peer sent content that does not match its digest");
                    }
                    missing.remove(&c.digest);
                    lock(&shared).stats.received_content += bytes.len() as u64;
                    unstaged_bytes += bytes.len();
                    unstaged.push((c.digest, bytes.clone()));
                    received.insert(c.digest, bytes);
                    // A long transfer is kept as it arrives, in batches: cut off, it resumes
                    // from here instead of fetching everything again.
                    // Written in the background while more content arrives.
                    let long = wanted_since.is_some_and(|t| t.elapsed() >= stage_after());
                    if long && unstaged_bytes >= STAGE_BYTES && !missing.is_empty() {
                        let batch = std::mem::take(&mut unstaged);
                        unstaged_bytes = 0;
                        let store_db = db.clone();
                        staging.push(tokio::task::spawn_blocking(move || {
                            stage_content(&store_db, &batch)
                        }));
                    }
                }
            }
        }
        unstaged.clear();
        for task in staging {
            task.await??;
        }
        tracing::debug!(fetched = received.len(), "a group's content is complete");

        let sender_clock = lock(&shared).peer_clock;
        let apply_db = db.clone();
        let (applied, mine) =
            tokio::task::spawn_blocking(move || -> Result<(fazt_sync::ApplyReport, Coverage)> {
                let mut db = apply_db.lock().unwrap_or_else(|e| e.into_inner());
                let mut used = Vec::new();
                let nets = changes;
                let mut remaining_uses: HashMap<[u8; 32], usize> = HashMap::new();
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
                            (None, _) => local_content(
                                &db,
                                &change.table,
                                &change.pk,
                                &change.cid,
                                &r.digest,
                            )?
                            .ok_or_else(|| {
                                anyhow!(
                                    "content {} vanished before it was applied",
                                    hex::encode(r.digest)
                                )
                            })?,
                        };
                        change.val = if r.text {
                            Value::Text(String::from_utf8(bytes).map_err(|_| {
                                anyhow!("the peer sent text content that is not UTF-8")
                            })?)
                        } else {
                            Value::Blob(bytes)
                        };
                        used.push(r.digest);
                    }
                    changes.push(change);
                }
                drop(received);
                // `fazt peer remove` takes effect at once, even on a session already open.
                if crate::peer::store::by_key(db.conn(), &peer)?.is_none() {
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
                        let mut delete =
                            tx.prepare_cached("DELETE FROM peer_content WHERE digest = ?1")?;
                        for digest in &used {
                            delete.execute([&digest[..]])?;
                        }
                        Ok(())
                    },
                )?;
                // Blobs a peer deleted that this node still references go back, and the
                // re-insert replicates (hosting::gc).
                crate::hosting::gc::rescue(&mut db)?;
                Ok((report, db.coverage()?))
            })
            .await??;
        let groups_applied = {
            let mut s = lock(&shared);
            s.groups_applied += 1;
            s.mine = mine.clone();
            s.stats.lag = versions_lacking(&s.mine, &s.their_heads);
            s.groups_applied
        };
        tracing::debug!(
            applied = applied.applied,
            transactions = applied.transactions,
            "applied a group"
        );
        out.send(Message::Applied {
            groups: groups_applied,
            heads: Heads::from(&mine),
        })
        .await
        .map_err(|_| Error::Cancelled)?;
        let _ = tick.send(());
    }
    Ok(())
}

/// Keeps fetched content in `peer_content`, in one transaction.
fn stage_content(db: &Mutex<Replica>, batch: &[([u8; 32], Arc<Vec<u8>>)]) -> Result<()> {
    let db = db.lock().unwrap_or_else(|e| e.into_inner());
    stage_rows(&db, batch)
}

fn stage_rows(db: &Replica, batch: &[([u8; 32], Arc<Vec<u8>>)]) -> Result<()> {
    // Staged content is a cache of what the peer still holds: a power cut that loses it only
    // means fetching it again, so its commits skip the fsync (the group's own commit, with
    // full durability, syncs the log they share).
    db.conn().pragma_update(None, "synchronous", "OFF")?;
    let staged = stage_in_transaction(db, batch);
    db.conn().pragma_update(None, "synchronous", "FULL")?;
    staged
}

fn stage_in_transaction(db: &Replica, batch: &[([u8; 32], Arc<Vec<u8>>)]) -> Result<()> {
    let tx = db.conn().unchecked_transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO peer_content (digest, data, received_at) VALUES (?1, ?2, ?3)",
        )?;
        let now = crate::db::now_secs();
        for (digest, bytes) in batch {
            insert.execute(rusqlite::params![&digest[..], bytes.as_slice(), now])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Bytes with `digest` this node already holds for a cell: the cell itself, or content
/// fetched earlier and not applied yet.
fn local_content(
    db: &Replica,
    table: &str,
    pk: &[u8],
    cid: &str,
    digest: &[u8; 32],
) -> Result<Option<Vec<u8>>> {
    if let Some(b) = db.cell(table, pk, cid)?.and_then(value_bytes) {
        if <[u8; 32]>::from(Sha256::digest(&b)) == *digest {
            return Ok(Some(b));
        }
    }
    use rusqlite::OptionalExtension;
    Ok(db
        .conn()
        .query_row(
            "SELECT data FROM peer_content WHERE digest = ?1",
            [&digest[..]],
            |r| r.get(0),
        )
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::frame::write_message;
    use fazt_sync::SiteId;

    fn node(dir: &std::path::Path, name: &str) -> (PathBuf, NodeId) {
        let path = dir.join(name);
        let db = crate::db::create(&path).unwrap();
        let key = crate::identity::load(db.conn()).unwrap().unwrap();
        (path, crate::identity::node_id(&key))
    }

    fn put_blob(path: &std::path::Path, bytes: &[u8]) {
        let mut db = crate::db::open_existing(path).unwrap();
        let hash = hex::encode(Sha256::digest(bytes));
        db.write(|tx| {
            tx.execute(
                "INSERT INTO blobs (hash, size, data) VALUES (?1, ?2, ?3)",
                rusqlite::params![hash, bytes.len() as i64, bytes],
            )
        })
        .unwrap();
    }

    fn rows(path: &std::path::Path) -> Vec<(String, i64, Vec<u8>)> {
        let db = crate::db::open_existing(path).unwrap();
        let mut stmt = db
            .conn()
            .prepare("SELECT hash, size, data FROM blobs ORDER BY hash")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    /// Runs a one-off session from `a` (Once) against `b` (Live) over an in-memory pipe.
    async fn sync(a: &(PathBuf, NodeId), b: &(PathBuf, NodeId)) -> (Stats, Stats) {
        for (me, other) in [(a, b), (b, a)] {
            let db = crate::db::open_existing(&me.0).unwrap();
            let name = crate::peer::store::PeerName::parse("peer").unwrap();
            crate::peer::store::add(db.conn(), &me.1, &name, &other.1, None).unwrap();
        }
        let (a_io, b_io) = tokio::io::duplex(64 * 1024);
        let (a_read, a_write) = tokio::io::split(a_io);
        let (b_read, b_write) = tokio::io::split(b_io);
        let changed_a = crate::peer::watch_db(&a.0).unwrap();
        let changed_b = crate::peer::watch_db(&b.0).unwrap();
        let session = |me: &(PathBuf, NodeId), other: &(PathBuf, NodeId), mode, changed| Session {
            db_path: me.0.clone(),
            own: me.1,
            peer: other.1,
            peer_name: "peer".into(),
            mode,
            changed,
            progress: None,
        };
        let live = tokio::spawn(session(b, a, Mode::Live, changed_b).run(b_read, b_write, None));
        let once = session(a, b, Mode::Once, changed_a).run(a_read, a_write, None);
        let a_stats = tokio::time::timeout(std::time::Duration::from_secs(20), once)
            .await
            .unwrap()
            .unwrap();
        let b_stats = tokio::time::timeout(std::time::Duration::from_secs(20), live)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        (a_stats, b_stats)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn content_the_peer_already_holds_is_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = node(dir.path(), "a.db");
        let b = node(dir.path(), "b.db");
        let shared: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let only_a: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 253) as u8).collect();
        // The same content written independently on both nodes, plus content only `a` has.
        put_blob(&a.0, &shared);
        put_blob(&b.0, &shared);
        put_blob(&a.0, &only_a);
        put_blob(&a.0, b"small values travel inline");
        // Large text travels as content too, and stays text.
        let text = "é".repeat(3000);
        crate::db::open_existing(&a.0)
            .unwrap()
            .write(|tx| {
                tx.execute(
                    "INSERT INTO settings (key, value) VALUES ('big', ?1)",
                    [&text],
                )
            })
            .unwrap();

        let (a_stats, b_stats) = sync(&a, &b).await;
        assert_eq!(rows(&a.0), rows(&b.0));
        let (kind, value): (String, String) = crate::db::open_existing(&b.0)
            .unwrap()
            .conn()
            .query_row(
                "SELECT typeof(value), value FROM settings WHERE key = 'big'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((kind.as_str(), value), ("text", text.clone()));
        assert_eq!(
            a_stats.sent_content,
            (only_a.len() + text.len()) as u64,
            "only the content b lacked travels"
        );
        assert_eq!(b_stats.sent_content, 0, "a already held everything b has");
        assert_eq!(
            crate::db::open_existing(&b.0).unwrap().coverage().unwrap(),
            crate::db::open_existing(&a.0).unwrap().coverage().unwrap()
        );
        // Nothing fetched is left behind once applied.
        let left: i64 = crate::db::open_existing(&b.0)
            .unwrap()
            .conn()
            .query_row("SELECT count(*) FROM peer_content", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);

        // A second sync has nothing to do and moves only the handshake.
        let (again, _) = sync(&a, &b).await;
        assert_eq!(
            (
                again.sent_changes,
                again.received_changes,
                again.sent_content
            ),
            (0, 0, 0)
        );
        assert!(
            again.sent_bytes < 1024,
            "idle handshake sent {} bytes",
            again.sent_bytes
        );
    }

    #[test]
    fn heads_and_coverage_convert_both_ways_and_count_what_is_lacking() {
        let mut c = Coverage::default();
        c.insert(SiteId([1; 16]), 1, 5);
        c.insert(SiteId([1; 16]), 9, 9);
        c.insert(SiteId([2; 16]), 3, 4);
        let h = Heads::from(&c);
        assert_eq!(
            h,
            Heads(vec![
                ([1; 16], vec![(1, 5), (9, 9)]),
                ([2; 16], vec![(3, 4)])
            ])
        );
        assert_eq!(Coverage::from(&h), c);
        // Overlapping and adjacent ranges from the wire merge into the coverage they mean.
        let messy = Heads(vec![([1; 16], vec![(1, 3), (2, 5), (6, 6), (9, 9)])]);
        assert_eq!(
            Coverage::from(&messy)
                .get(&SiteId([1; 16]))
                .unwrap()
                .ranges(),
            &[(1, 6), (9, 9)]
        );
        assert_eq!(Coverage::from(&Heads::default()), Coverage::default());
        // The clock a peer declares is the highest version anywhere in its heads.
        assert_eq!(clock_of(&c), 9);
        assert_eq!(clock_of(&Coverage::default()), 0);
        // Lag: versions held here that the other side lacks, across origins.
        let mut theirs = Coverage::default();
        theirs.insert(SiteId([1; 16]), 1, 3);
        assert_eq!(versions_lacking(&c, &theirs), 2 + 1 + 2);
        assert_eq!(versions_lacking(&c, &c), 0);
        assert_eq!(versions_lacking(&theirs, &c), 0);
        let mut huge = Coverage::default();
        huge.insert(SiteId([3; 16]), 1, wire::MAX_VERSION);
        assert_eq!(versions_lacking(&huge, &c), wire::MAX_VERSION as u64);
    }

    #[test]
    fn large_values_become_content_references_and_small_ones_stay_inline() {
        let change = |val: Value| Change {
            table: "blobs".into(),
            pk: vec![1, 2, 3],
            cid: "data".into(),
            val,
            col_version: 1,
            db_version: 1,
            site_id: SiteId([1; 16]),
            cl: 1,
            seq: 0,
        };
        let kept = AtomicUsize::new(0);
        let mut offered = Vec::new();
        let small = vec![5u8; wire::CONTENT_MIN - 1];
        let (net, _) = to_net(change(Value::Blob(small.clone())), &mut offered, &kept);
        assert!(net.content.is_none());
        assert_eq!(
            Change::from_wire(net.change).val,
            Value::Blob(small),
            "inline"
        );
        assert!(offered.is_empty());

        let big = vec![6u8; wire::CONTENT_MIN];
        let (net, _) = to_net(change(Value::Blob(big.clone())), &mut offered, &kept);
        let r = net.content.expect("a reference");
        assert_eq!(r.digest, <[u8; 32]>::from(Sha256::digest(&big)));
        assert_eq!((r.len, r.text), (big.len() as u64, false));
        assert_eq!(net.change.val, fazt_proto::bundle::WireValue::Null);
        let text = "x".repeat(wire::CONTENT_MIN);
        let (net, _) = to_net(change(Value::Text(text.clone())), &mut offered, &kept);
        assert!(net.content.unwrap().text);
        assert_eq!(offered.len(), 2);
        assert_eq!(offered[0].1.bytes.as_deref(), Some(&big));
        assert_eq!(kept.load(Ordering::Relaxed), big.len() + text.len());
    }

    #[test]
    fn offered_content_beyond_the_memory_budget_is_read_again_not_kept() {
        let kept = AtomicUsize::new(KEEP_OFFERED_BYTES - 10);
        let mut offered = Vec::new();
        let change = Change {
            table: "blobs".into(),
            pk: vec![1],
            cid: "data".into(),
            val: Value::Blob(vec![1; 2048]),
            col_version: 1,
            db_version: 1,
            site_id: SiteId([1; 16]),
            cl: 1,
            seq: 0,
        };
        let (net, _) = to_net(change, &mut offered, &kept);
        assert!(net.content.is_some());
        assert!(offered[0].1.bytes.is_none());
        assert_eq!(kept.load(Ordering::Relaxed), KEEP_OFFERED_BYTES - 10);
    }

    /// Changes a test adds to the scripted peer's group, with the version they complete.
    type Forged = Option<(Vec<NetChange>, SiteId, i64)>;

    /// What a scripted peer does when the session under test asks for content.
    type Answer = fn([u8; 32], &[u8]) -> Vec<Content>;

    /// `a`'s real changes (everything it holds), as the wire carries them, with their content.
    fn wire_changes(a: &std::path::Path) -> (Vec<NetChange>, Coverage, HashMap<[u8; 32], Vec<u8>>) {
        let db = crate::db::open_existing(a).unwrap();
        let batch = db.batch_since(&Coverage::default()).unwrap();
        let kept = AtomicUsize::new(0);
        let mut offered = Vec::new();
        let nets = batch
            .changes
            .into_iter()
            .map(|c| to_net(c, &mut offered, &kept).0)
            .collect();
        let content = offered
            .into_iter()
            .map(|(d, o)| (d, o.bytes.unwrap().as_ref().clone()))
            .collect();
        (nets, db.coverage().unwrap(), content)
    }

    /// Plays `a` (trusted by `b`) by hand against a live session on `b`: Hello with `schema`,
    /// all of `a`'s changes as one group, and content as `answer` says. Returns how `b`'s
    /// session ended and the messages it sent after its Hello.
    async fn scripted(
        a: &(PathBuf, NodeId),
        b: &(PathBuf, NodeId),
        schema: u32,
        answer: Answer,
        forged: Forged,
    ) -> (Result<Stats, Error>, Vec<Message>) {
        let db = crate::db::open_existing(&b.0).unwrap();
        let name = crate::peer::store::PeerName::parse("a").unwrap();
        if crate::peer::store::by_key(db.conn(), &a.1)
            .unwrap()
            .is_none()
        {
            crate::peer::store::add(db.conn(), &b.1, &name, &a.1, None).unwrap();
        }
        drop(db);
        let (mut nets, mut covers, content) = wire_changes(&a.0);
        if let Some((extra, site, version)) = forged {
            nets.extend(extra);
            covers.insert(site, version, version);
        }
        let (mine, theirs) = tokio::io::duplex(64 * 1024);
        let (b_read, b_write) = tokio::io::split(theirs);
        let (mut read, mut write) = tokio::io::split(mine);
        let (_keep, changed) = watch::channel(0u64);
        let session = Session {
            db_path: b.0.clone(),
            own: b.1,
            peer: a.1,
            peer_name: "a".into(),
            mode: Mode::Live,
            changed,
            progress: None,
        };
        let run = tokio::spawn(session.run(b_read, b_write, None));
        let script = async {
            let mut seen = Vec::new();
            write_message(
                &mut write,
                &Message::Hello(Hello {
                    node: *a.1.as_bytes(),
                    protocol: fazt_proto::PROTOCOL_VERSION,
                    schema,
                    heads: Heads::from(&covers),
                }),
            )
            .await?;
            let Some((Message::Hello(_), _)) = read_message(&mut read).await? else {
                bail!("no Hello first");
            };
            write_message(
                &mut write,
                &Message::Changes(Changes {
                    changes: nets,
                    complete: Some(Heads::from(&covers)),
                }),
            )
            .await?;
            while let Some((msg, _)) = read_message(&mut read).await? {
                match &msg {
                    Message::Want(digests) => {
                        for d in digests {
                            for c in answer(*d, &content[d]) {
                                write_message(&mut write, &Message::Content(c)).await?;
                            }
                        }
                    }
                    Message::Applied { .. } => {
                        seen.push(msg);
                        break;
                    }
                    _ => {}
                }
                seen.push(msg);
            }
            Ok(seen)
        };
        let seen = tokio::time::timeout(std::time::Duration::from_secs(20), script)
            .await
            .expect("the scripted peer finished");
        // The peer hangs up: a live session that ended well returns Ok.
        drop(write);
        drop(read);
        let result = tokio::time::timeout(std::time::Duration::from_secs(20), run)
            .await
            .expect("the session ended")
            .unwrap();
        (result, seen.unwrap_or_default())
    }

    fn chunks(digest: [u8; 32], bytes: &[u8], size: usize) -> Vec<Content> {
        bytes
            .chunks(size)
            .enumerate()
            .map(|(i, data)| Content {
                digest,
                gone: false,
                total: bytes.len() as u64,
                offset: (i * size) as u64,
                data: data.to_vec(),
            })
            .collect()
    }

    /// Everything `b` holds that a group from a peer could change.
    /// Blob rows, coverage, and staged content rows.
    type Holdings = (Vec<(String, i64, Vec<u8>)>, Coverage, i64);

    fn holdings(path: &std::path::Path) -> Holdings {
        let db = crate::db::open_existing(path).unwrap();
        let staged: i64 = db
            .conn()
            .query_row("SELECT count(*) FROM peer_content", [], |r| r.get(0))
            .unwrap();
        (rows(path), db.coverage().unwrap(), staged)
    }

    /// Two nodes; `a` holds a blob large enough to travel as content.
    fn with_content() -> (
        tempfile::TempDir,
        (PathBuf, NodeId),
        (PathBuf, NodeId),
        Vec<u8>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let a = node(dir.path(), "a.db");
        let b = node(dir.path(), "b.db");
        let blob: Vec<u8> = (0..40_000u32).map(|i| (i * 31 % 241) as u8).collect();
        put_blob(&a.0, &blob);
        (dir, a, b, blob)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn honest_content_in_chunks_is_applied_and_acknowledged() {
        let (_dir, a, b, blob) = with_content();
        let (result, seen) = scripted(
            &a,
            &b,
            crate::db::migrations::latest_version(),
            |d, b| chunks(d, b, 7_000),
            None,
        )
        .await;
        result.unwrap();
        assert!(
            matches!(seen.last(), Some(Message::Applied { groups: 1, .. })),
            "{seen:?}"
        );
        let (blobs, coverage, staged) = holdings(&b.0);
        assert!(blobs.iter().any(|(_, _, data)| *data == blob));
        let theirs = crate::db::open_existing(&a.0).unwrap().coverage().unwrap();
        assert_eq!(
            theirs.minus(&coverage),
            Coverage::default(),
            "b holds all of a"
        );
        assert_eq!(staged, 0);
    }

    /// A hostile answer ends the session with `reason`; the group is not applied.
    async fn refused(answer: Answer, reason: &str) {
        let (_dir, a, b, blob) = with_content();
        let before = holdings(&b.0);
        let (result, seen) = scripted(
            &a,
            &b,
            crate::db::migrations::latest_version(),
            answer,
            None,
        )
        .await;
        let err = format!(
            "{:#}",
            result.expect_err("the session must end with an error")
        );
        assert!(err.contains(reason), "{err}");
        assert!(
            !seen.iter().any(|m| matches!(m, Message::Applied { .. })),
            "{seen:?}"
        );
        assert_eq!(holdings(&b.0), before, "nothing of the group was applied");
        assert!(!holdings(&b.0).0.iter().any(|(_, _, d)| *d == blob));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn content_that_does_not_match_its_digest_ends_the_session() {
        refused(
            |d, b| {
                let mut bytes = b.to_vec();
                bytes[100] ^= 1;
                chunks(d, &bytes, 7_000)
            },
            "does not match its digest",
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn content_chunks_out_of_order_end_the_session() {
        refused(
            |d, b| {
                let mut parts = chunks(d, b, 7_000);
                parts.swap(0, 1);
                parts
            },
            "content out of order",
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn content_the_peer_says_is_gone_ends_the_session() {
        refused(
            |d, _| {
                vec![Content {
                    digest: d,
                    gone: true,
                    total: 0,
                    offset: 0,
                    data: Vec::new(),
                }]
            },
            "content changed on the peer",
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn content_longer_than_the_peer_announced_ends_the_session() {
        refused(
            |d, b| {
                let mut parts = chunks(d, b, 7_000);
                for p in &mut parts {
                    p.total = 1_000;
                }
                parts
            },
            "content chunk beyond its total",
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_with_a_newer_schema_is_accepted_and_changes_for_tables_this_node_lacks_wait() {
        let dir = tempfile::tempdir().unwrap();
        let a = node(dir.path(), "a.db");
        let b = node(dir.path(), "b.db");
        // `a` runs a newer fazt: it has a replicated table `b` does not know yet.
        let create = "CREATE TABLE future_things (id TEXT PRIMARY KEY NOT NULL, note TEXT)";
        {
            let mut db = crate::db::open_existing(&a.0).unwrap();
            db.conn().execute_batch(create).unwrap();
            db.replicate("future_things").unwrap();
            db.write(|tx| {
                tx.execute(
                    "INSERT INTO future_things (id, note) VALUES ('one', 'from the future')",
                    [],
                )
            })
            .unwrap();
        }
        put_blob(&a.0, b"a blob b can apply now");
        let (result, seen) = scripted(
            &a,
            &b,
            crate::db::migrations::latest_version() + 1,
            |d, b| chunks(d, b, 1 << 20),
            None,
        )
        .await;
        result.unwrap();
        assert!(
            matches!(seen.last(), Some(Message::Applied { .. })),
            "{seen:?}"
        );
        let pending = |path: &std::path::Path| -> i64 {
            crate::db::open_existing(path)
                .unwrap()
                .conn()
                .query_row(
                    "SELECT count(*) FROM fazt_sync_pending WHERE tbl = 'future_things'",
                    [],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert!(pending(&b.0) > 0, "the change waits in the pending area");
        assert!(rows(&b.0)
            .iter()
            .any(|(_, _, d)| d == b"a blob b can apply now"));

        // The upgrade creates the table: the waiting change is applied.
        let mut db = crate::db::open_existing(&b.0).unwrap();
        db.conn().execute_batch(create).unwrap();
        db.replicate("future_things").unwrap();
        let note: String = db
            .conn()
            .query_row("SELECT note FROM future_things WHERE id = 'one'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(note, "from the future");
        assert_eq!(pending(&b.0), 0);
    }

    /// The whole database file as text (schema and every row), for "nothing changed".
    fn everything(path: &std::path::Path) -> String {
        let conn = rusqlite::Connection::open(path).unwrap();
        let names: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let mut out = String::new();
        for name in names {
            let mut stmt = conn.prepare(&format!("SELECT * FROM \"{name}\"")).unwrap();
            let n = stmt.column_count();
            let mut lines: Vec<String> = stmt
                .query_map([], |r| {
                    Ok((0..n)
                        .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                        .collect::<Vec<_>>()
                        .join("|"))
                })
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            lines.sort();
            out.push_str(&format!("== {name}\n{}\n", lines.join("\n")));
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_naming_node_local_tables_changes_none_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let a = node(dir.path(), "a.db");
        let b = node(dir.path(), "b.db");
        // Trusted first (the session needs it), so the peers row exists before the snapshot.
        crate::peer::store::add(
            crate::db::open_existing(&b.0).unwrap().conn(),
            &b.1,
            &crate::peer::store::PeerName::parse("a").unwrap(),
            &a.1,
            None,
        )
        .unwrap();
        let local = |p: &std::path::Path| {
            let all = everything(p);
            crate::db::NODE_LOCAL_TABLES
                .iter()
                .map(|t| {
                    let head = format!("== {t}\n");
                    let from = all.find(&head).unwrap_or_else(|| panic!("no table {t}"));
                    let rest = &all[from + head.len()..];
                    let to = rest.find("\n== ").map_or(rest.len(), |i| i + 1);
                    format!("{head}{}", &rest[..to])
                })
                .collect::<String>()
        };
        let before = local(&b.0);
        // a's honest changes, plus one transaction of a's that writes b's node-local tables:
        // a new address for a, a new name and key for this node, a fresh invitation.
        let site = crate::db::open_existing(&a.0).unwrap().site_id();
        let text = |t: &str| fazt_sync::pack::pack(&[Value::Text(t.into())]);
        let forged = [
            (
                "peers",
                text("a"),
                "addr",
                Value::Text("evil.example:1".into()),
            ),
            (
                "peers",
                text("evil"),
                "node_id",
                Value::Text(a.1.to_string()),
            ),
            (
                "node_config",
                text("name"),
                "value",
                Value::Text("owned".into()),
            ),
            (
                "node_identity",
                fazt_sync::pack::pack(&[Value::Integer(1)]),
                "secret",
                Value::Blob(vec![0; 32]),
            ),
            (
                "peer_invites",
                text("00"),
                "expires_at",
                Value::Integer(i64::MAX >> 12),
            ),
        ];
        let version = crate::db::open_existing(&a.0)
            .unwrap()
            .db_version()
            .unwrap()
            + 1;
        let extra: Vec<NetChange> = forged
            .into_iter()
            .enumerate()
            .map(|(seq, (table, pk, cid, val))| NetChange {
                change: Change {
                    table: table.into(),
                    pk,
                    cid: cid.into(),
                    val,
                    col_version: 1,
                    db_version: version,
                    site_id: site,
                    cl: 1,
                    seq: seq as i64,
                }
                .to_wire(),
                content: None,
            })
            .collect();
        let (result, seen) = scripted(
            &a,
            &b,
            crate::db::migrations::latest_version(),
            |d, b| chunks(d, b, 1 << 20),
            Some((extra, site, version)),
        )
        .await;
        result.unwrap();
        assert!(
            matches!(seen.last(), Some(Message::Applied { .. })),
            "{seen:?}"
        );
        assert_eq!(local(&b.0), before, "node-local tables are byte-identical");
        let parked: i64 = crate::db::open_existing(&b.0)
            .unwrap()
            .conn()
            .query_row("SELECT count(*) FROM fazt_sync_pending", [], |r| r.get(0))
            .unwrap();
        assert_eq!(parked, 5, "the forged changes wait, never applied");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_refuses_a_peer_that_is_not_the_one_expected() {
        let dir = tempfile::tempdir().unwrap();
        let a = node(dir.path(), "a.db");
        let b = node(dir.path(), "b.db");
        let c = node(dir.path(), "c.db");
        // `a` expects to talk to `c`, but `b` answers.
        let (a_io, b_io) = tokio::io::duplex(64 * 1024);
        let (a_read, a_write) = tokio::io::split(a_io);
        let (b_read, b_write) = tokio::io::split(b_io);
        let (_k1, w1) = watch::channel(0u64);
        let (_k2, w2) = watch::channel(0u64);
        let sa = Session {
            db_path: a.0.clone(),
            own: a.1,
            peer: c.1,
            peer_name: "c".into(),
            mode: Mode::Once,
            changed: w1,
            progress: None,
        };
        let sb = Session {
            db_path: b.0.clone(),
            own: b.1,
            peer: a.1,
            peer_name: "a".into(),
            mode: Mode::Live,
            changed: w2,
            progress: None,
        };
        let other = tokio::spawn(sb.run(b_read, b_write, None));
        let err = sa.run(a_read, a_write, None).await.unwrap_err();
        assert!(err.to_string().contains("another node"), "{err}");
        other.abort();
    }

    /// Runs a one-off session on `b` against a hand-played `a` whose first message is
    /// `first(a's id)`, not a proper Hello; returns how the session ended.
    async fn answered_with(first: impl FnOnce(NodeId) -> Message) -> Error {
        let dir = tempfile::tempdir().unwrap();
        let a = node(dir.path(), "a.db");
        let b = node(dir.path(), "b.db");
        let (mine, theirs) = tokio::io::duplex(64 * 1024);
        let (b_read, b_write) = tokio::io::split(theirs);
        let (mut read, mut write) = tokio::io::split(mine);
        let (_keep, changed) = watch::channel(0u64);
        let session = Session {
            db_path: b.0.clone(),
            own: b.1,
            peer: a.1,
            peer_name: "a".into(),
            mode: Mode::Once,
            changed,
            progress: None,
        };
        let run = tokio::spawn(session.run(b_read, b_write, None));
        let _hello = read_message(&mut read).await.unwrap();
        write_message(&mut write, &first(a.1)).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(20), run)
            .await
            .expect("the session ended")
            .unwrap()
            .expect_err("the session must fail")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_instead_of_hello_is_refused_with_the_other_nodes_reason() {
        let err = answered_with(|_| Message::Refuse("this node does not trust yours".into())).await;
        match &err {
            Error::Refused {
                peer,
                during: Stage::Hello,
                reason,
            } => {
                assert_eq!(peer, "a");
                assert_eq!(reason, "this node does not trust yours");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(
            format!("{err:#}"),
            "a refused the session: this node does not trust yours"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_message_other_than_hello_breaks_the_protocol() {
        let err = answered_with(|_| Message::Welcome { name: "a".into() }).await;
        assert!(
            matches!(
                err,
                Error::Protocol {
                    what: Violation::FirstNotHello,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            format!("{err:#}"),
            "a broke the protocol: its first message was not Hello"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hello_in_another_protocol_version_is_a_version_mismatch() {
        let theirs = fazt_proto::PROTOCOL_VERSION + 1;
        let err = answered_with(|a| {
            Message::Hello(Hello {
                node: *a.as_bytes(),
                protocol: theirs,
                schema: crate::db::migrations::latest_version(),
                heads: Heads::from(&Coverage::default()),
            })
        })
        .await;
        assert!(
            matches!(
                err,
                Error::VersionMismatch { theirs: Some(v), .. } if v == theirs
            ),
            "{err:?}"
        );
        assert_eq!(
            format!("{err:#}"),
            format!(
                "a speaks protocol version {theirs}, this node {}: upgrade the older one",
                fazt_proto::PROTOCOL_VERSION
            )
        );
    }

    #[test]
    fn an_export_whose_session_is_gone_is_cancelled_not_an_engine_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = node(dir.path(), "a.db");
        put_blob(&a.0, &[7; 100]);
        let db = crate::db::open_existing(&a.0).unwrap();
        let (pieces, gone) = mpsc::channel(1);
        drop(gone);
        let kept = AtomicUsize::new(0);
        let err = export_pass(&db, &Coverage::default(), &pieces, &kept).unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err:?}");
    }
}
