//! One replication session with a peer over one bidirectional stream.
//!
//! Both sides run the same code (docs/sync-protocol.md, "A session"), as the phases of
//! [`Phase`]:
//! 1. greeting: each sends `Hello` with the versions it holds per origin;
//! 2. catching up: each exports what the other lacks as groups of whole origin transactions,
//!    at most [`Limits::window`] groups ahead of the other's `Applied` acknowledgements
//!    ([`export`]); large blobs travel as content references, and the receiver fetches
//!    (`Want`/`Content`) only the content it does not hold, keeps it in `peer_content` as it
//!    arrives once the transfer has lasted a while ([`content`]), and applies each group in
//!    one transaction once its content is complete ([`apply`]);
//! 3. live: whenever this node comes to hold more ([`Holdings`]: local writes to replicated
//!    tables, merges by any connection or session) the session tells the peer what is new
//!    (an `Applied` carrying only that), and exports it if the peer lacks it, until the peer
//!    hangs up; a one-off session instead ends once both sides hold the same versions.
//!
//! The conductor here reads the peer's messages and moves between the phases; SQLite work
//! runs on blocking threads, each task with its own connection, so a slow export never holds
//! up applying or serving content. What the session needs from the node it runs in comes in
//! through [`Node`] and [`Limits`].

mod apply;
mod content;
mod export;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, Weak};

use anyhow::{anyhow, Context, Result};
use fazt_proto::wire::{Changes, Content, Heads, Hello, Message};
use fazt_proto::{Digest, NodeId};
use fazt_sync::{Coverage, DbVersion, Replica};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::error::{Closed, Stage, Theirs, Violation};
use super::frame::read_message;
use super::{Error, Limits};
use apply::Incoming;
use content::ApplyDb;
use export::Offers;

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
    /// Changes received that this node already held when it applied them (their origin
    /// transaction had arrived another way): a debug figure for duplicate delivery.
    pub duplicates: u64,
    pub sent_changes: u64,
    pub received_changes: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub sent_content: u64,
    pub received_content: u64,
    /// Origin versions this node holds that the peer does not (as last reported).
    pub lag: u64,
    /// Export passes started: times the exporter woke and looked for what the peer lacks (a
    /// debug figure; publishing it alone is not worth a report).
    pub export_passes: u64,
}

/// What a session needs from the node it runs in, passed in so that the session knows none
/// of the node's internals.
#[derive(Clone, Copy)]
pub struct Node {
    /// The schema version of this node's database, announced in Hello.
    pub schema: u32,
    /// Unix seconds now (when fetched content was kept).
    pub now: fn() -> i64,
    /// Whether this node still trusts the peer, asked before each group is applied: `fazt
    /// peer remove` takes effect at once, even on a session already open.
    pub trusts: fn(&Replica, &NodeId) -> Result<bool>,
    /// Runs after each group is applied, on the applying connection.
    pub after_apply: fn(&mut Replica) -> Result<()>,
}

/// How sessions open connections to this node's database with the replication engine on it.
/// An engine connection holds about 1 MB (mostly its parsed schema and triggers), so a
/// session holds few: one to export, used by its exporter alone (a pass may wait for the
/// peer's acknowledgements as long as the peer takes); one to serve content, only while the
/// peer asks for content no longer in memory; and the node's applying connection, shared by
/// every session of the node ([`Connect::applier`]): a node makes one `Connect` and gives
/// each session a clone.
#[derive(Clone)]
pub struct Connect {
    open: Arc<dyn Fn() -> Result<Replica> + Send + Sync>,
    /// The applying connection while any session holds it.
    applier: Arc<Mutex<Weak<Mutex<Replica>>>>,
}

impl Connect {
    pub fn new(open: impl Fn() -> Result<Replica> + Send + Sync + 'static) -> Connect {
        Connect {
            open: Arc::new(open),
            applier: Arc::default(),
        }
    }

    /// A connection of the caller's own (blocking).
    fn open(&self) -> Result<Replica> {
        (self.open)()
    }

    /// The node's applying connection (blocking): opened by the first session that needs
    /// it, shared by the sessions that run meanwhile, closed with the last. Applying groups
    /// writes, and SQLite lets one connection write at a time anyway; the sessions take turns
    /// on its lock instead of on SQLite's. It tunes itself for that: no automatic checkpoint
    /// (copying a large transfer from the WAL into the database file is left to the node's
    /// other connections, which SQLite checkpoints on their next commit, not done on the path
    /// between receiving a group and acknowledging it).
    fn applier(&self) -> Result<ApplyDb> {
        let mut slot = self.applier.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = slot.upgrade() {
            return Ok(db);
        }
        let db = self.open()?;
        db.conn().pragma_update(None, "wal_autocheckpoint", 0)?;
        let db = Arc::new(Mutex::new(db));
        *slot = Arc::downgrade(&db);
        Ok(db)
    }
}

/// A session's settings.
pub struct Session {
    pub connect: Connect,
    pub own: NodeId,
    pub peer: NodeId,
    pub peer_name: String,
    pub mode: Mode,
    pub node: Node,
    pub limits: Limits,
    /// What this node holds, shared by all its sessions: the session tells its peer whenever
    /// it grows, exports from it, and grows it with what it applies.
    pub holdings: Holdings,
    /// Receives the session's figures as they change.
    pub progress: Option<watch::Sender<Stats>>,
}

/// Where a session stands (the steps of docs/sync-protocol.md, "A session"). It moves only
/// in [`Conductor::on`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// This side's Hello is sent; the peer's first message must be its Hello.
    Greeting,
    /// Each side exports what the other lacks, fetches content and applies, until both hold
    /// the same versions with nothing in flight either way.
    CatchingUp,
    /// A [`Mode::Live`] session that caught up once: local commits are exported as they come,
    /// until the peer hangs up.
    Live,
    /// Over, and well: caught up ([`Mode::Once`]), or the peer hung up ([`Mode::Live`]).
    Done,
}

/// What the conductor reacts to.
enum Event {
    /// A message from the peer, with its size on the wire.
    Received(Message, usize),
    /// The peer ended the stream cleanly.
    HungUp,
    /// A task exported or applied something: the figures changed, the sides may be converged.
    Progressed,
}

/// What this node holds, per origin, kept in memory for all of its sessions at once: grown
/// by each session's applier right after its apply commits (so that every session can tell
/// its peer at once), and read again from SQLite once per tick of the node's
/// replicated-state watch (local writes, other processes' merges), one read for the node,
/// not one per session. It only grows, and claims only what is committed: it may lag SQLite
/// by a tick of that watch, never lead it.
#[derive(Clone)]
pub struct Holdings(Arc<watch::Sender<Arc<Coverage>>>);

impl Holdings {
    /// Holdings that start at `held` and grow only through [`Holdings::grow`].
    pub fn new(held: Coverage) -> Holdings {
        Holdings(Arc::new(watch::Sender::new(Arc::new(held))))
    }

    /// What the database `connect` opens holds, read again at every tick of `changed` (the
    /// node's replicated-state watch) until `changed` ends or the holdings are dropped.
    pub async fn follow(connect: Connect, mut changed: watch::Receiver<u64>) -> Result<Holdings> {
        changed.borrow_and_update();
        let (mut db, held) = tokio::task::spawn_blocking(move || -> Result<_> {
            let db = connect.open()?;
            let held = db.coverage()?;
            Ok((db, held))
        })
        .await??;
        let holdings = Holdings::new(held);
        let hub = Arc::downgrade(&holdings.0);
        tokio::spawn(async move {
            while changed.changed().await.is_ok() {
                if hub.strong_count() == 0 {
                    return;
                }
                let Ok((back, held)) = tokio::task::spawn_blocking(move || {
                    let held = db.coverage();
                    (db, held)
                })
                .await
                else {
                    return;
                };
                db = back;
                match (held, hub.upgrade()) {
                    (Ok(held), Some(hub)) => {
                        Holdings(hub).grow(&held);
                    }
                    (Err(e), Some(_)) => {
                        tracing::debug!(error = %e, "reading what this node holds");
                    }
                    (_, None) => return,
                }
            }
        });
        Ok(holdings)
    }

    /// This node now holds `held` too (committed). Returns whether that is news.
    pub fn grow(&self, held: &Coverage) -> bool {
        self.0.send_if_modified(|now| {
            if held.minus(now).0.is_empty() {
                return false;
            }
            Arc::make_mut(now).union(held);
            true
        })
    }

    /// What this node holds now.
    pub fn now(&self) -> Arc<Coverage> {
        self.0.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Arc<Coverage>> {
        self.0.subscribe()
    }
}

/// The highest version in `heads`: for an honest node's heads, its Lamport clock. The clock
/// is the highest version the node wrote, merged or recorded as covered, each of which is in
/// its coverage of some origin (its own origin's coverage ends at its newest write, which may
/// be below the clock); so every cover it sends is within it.
fn clock_of(heads: &Coverage) -> DbVersion {
    heads
        .0
        .values()
        .filter_map(|r| r.ranges().last().map(|&(_, end)| end))
        .max()
        .unwrap_or_default()
}

/// Versions in `a` that `b` lacks.
fn versions_lacking(a: &Coverage, b: &Coverage) -> u64 {
    a.minus(b)
        .0
        .values()
        .flat_map(|r| r.ranges().iter())
        .fold(0u64, |n, &(s, e)| {
            n.saturating_add(u64::try_from(e.0.saturating_sub(s.0).saturating_add(1)).unwrap_or(0))
        })
}

/// State shared by the session's tasks.
#[derive(Default)]
struct Shared {
    /// What the peer holds, as far as this side knows: its Hello, its acknowledgements,
    /// what it sent, and what was sent to it.
    peer_known: Coverage,
    /// What the peer said it holds (Hello and Applied), plus what it sent.
    their_heads: Coverage,
    /// What this side holds, as the session last looked at [`Holdings`].
    mine: Arc<Coverage>,
    /// What the peer was told this side holds: the Hello's heads, the Applied heads, and the
    /// groups sent to it (the peer's `their_heads` of this side). An Applied carries what this
    /// side holds beyond it.
    told: Coverage,
    /// The peer's Lamport clock as it declares it: the highest version in its Hello and
    /// Applied heads (its own coverage ends there). Covers it sends are believed up to it.
    peer_clock: DbVersion,
    stats: Stats,
    groups_sent: u64,
    groups_acked: u64,
    exporting: bool,
    groups_received: u64,
    /// Part of a group has arrived, not its end.
    mid_group: bool,
    groups_applied: u64,
}

impl Shared {
    /// The peer said it holds `heads` (its Hello, or an Applied: at least these, in addition
    /// to what it said before, so they are added, never taken as all it holds).
    fn heard(&mut self, heads: &Coverage) {
        self.peer_clock = self.peer_clock.max(clock_of(heads));
        self.peer_known.union(heads);
        self.their_heads.union(heads);
        self.stats.lag = versions_lacking(&self.mine, &self.their_heads);
    }
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(shared: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    // A panicking task is reported through its join handle; the state is still usable.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Both sides hold the same versions and nothing is in flight either way.
fn converged(shared: &SharedRef) -> bool {
    let s = lock(shared);
    !s.exporting
        && !s.mid_group
        && s.groups_received == s.groups_applied
        && s.groups_acked >= s.groups_sent
        && *s.mine == s.their_heads
}

impl Session {
    /// Runs the session until the stream ends (Live) or both sides hold the same versions
    /// (Once). `recv`/`send` are the two halves of one stream; `first` is the peer's Hello
    /// when the caller has read it already.
    pub async fn run<R, W>(self, mut recv: R, send: W, first: Option<Hello>) -> Result<Stats, Error>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let connect = self.connect.clone();
        // SQLite runs on blocking threads only, from opening on.
        let mine = self.holdings.now();
        let (exporter_db, applier_db) = tokio::task::spawn_blocking(move || -> Result<_> {
            let applier = connect.applier()?;
            Ok((connect.open()?, applier))
        })
        .await
        .map_err(anyhow::Error::from)??;
        let shared: SharedRef = Arc::new(Mutex::new(Shared {
            mine: mine.clone(),
            told: (*mine).clone(),
            ..Shared::default()
        }));

        // Everything this side sends goes through one writer task.
        let (out_tx, out_rx) = mpsc::channel::<Message>(16);
        let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<anyhow::Error>();
        let (tick_tx, mut tick_rx) = mpsc::unbounded_channel::<()>();
        let writer = spawn_task(write_loop(send, out_rx, shared.clone()), fail_tx.clone());

        out_tx
            .send(Message::Hello(Hello {
                node: self.own,
                protocol: fazt_proto::PROTOCOL_VERSION,
                schema: self.node.schema,
                heads: Heads::from(&*mine),
            }))
            .await
            .map_err(|_| self.error_closed(Closed::BeforeSending))?;

        let (acked_tx, acked_rx) = watch::channel(0u64);
        let (apply_tx, apply_rx) = mpsc::unbounded_channel::<Incoming>();
        let (want_tx, want_rx) = mpsc::unbounded_channel::<Vec<Digest>>();
        let (content_tx, content_rx) = mpsc::unbounded_channel::<Content>();
        let mut conductor = Conductor {
            session: &self,
            phase: Phase::Greeting,
            shared: shared.clone(),
            offers: Arc::new(Offers::new(self.limits.keep_offered_bytes)),
            start: Some(Start {
                exporter_db,
                applier_db,
                out: out_tx,
                fail: fail_tx,
                tick: tick_tx,
                acked: acked_rx,
                groups: apply_rx,
                wants: want_rx,
                content: content_rx,
            }),
            acked: acked_tx,
            apply: apply_tx,
            wants: want_tx,
            content: content_tx,
            tasks: vec![writer],
        };

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
        let first = first.map(|hello| Event::Received(Message::Hello(hello), 0));
        let result = conductor
            .conduct(first, &mut msg_rx, &mut fail_rx, &mut tick_rx)
            .await;
        reader.abort();
        for t in conductor.tasks {
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
        if hello.node != self.peer {
            return Err(self.error_protocol(Violation::NotWhoItAuthenticatedAs));
        }
        if hello.protocol != fazt_proto::PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                peer: self.peer_name.clone(),
                theirs: Theirs::Hello(hello.protocol),
            });
        }
        let schema = self.node.schema;
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

    /// Publishes the figures when they changed. Only then: the server writes them to the
    /// peers table (a node-local commit, which wakes no exporter, but is a write).
    fn report(&self, shared: &SharedRef) {
        if let Some(progress) = &self.progress {
            let stats = lock(shared).stats.clone();
            progress.send_if_modified(|old| {
                let changed = Stats {
                    export_passes: old.export_passes,
                    ..stats.clone()
                } != *old;
                if changed {
                    *old = stats;
                }
                changed
            });
        }
    }
}

/// What the session's tasks take when the greeting is over: their connections and their
/// ends of the channels.
struct Start {
    exporter_db: Replica,
    applier_db: ApplyDb,
    out: mpsc::Sender<Message>,
    fail: mpsc::UnboundedSender<anyhow::Error>,
    tick: mpsc::UnboundedSender<()>,
    acked: watch::Receiver<u64>,
    groups: mpsc::UnboundedReceiver<Incoming>,
    wants: mpsc::UnboundedReceiver<Vec<Digest>>,
    content: mpsc::UnboundedReceiver<Content>,
}

/// Reads the peer's messages, hands them to the tasks, and moves the session between its
/// phases.
struct Conductor<'s> {
    session: &'s Session,
    phase: Phase,
    shared: SharedRef,
    offers: Arc<Offers>,
    /// Until the greeting is over.
    start: Option<Start>,
    acked: watch::Sender<u64>,
    apply: mpsc::UnboundedSender<Incoming>,
    wants: mpsc::UnboundedSender<Vec<Digest>>,
    content: mpsc::UnboundedSender<Content>,
    tasks: Vec<JoinHandle<()>>,
}

impl Conductor<'_> {
    /// Runs until the session is [`Phase::Done`] or fails. `first` is handled before
    /// anything the stream brings.
    async fn conduct(
        &mut self,
        first: Option<Event>,
        messages: &mut mpsc::Receiver<Result<Option<(Message, usize)>>>,
        failed: &mut mpsc::UnboundedReceiver<anyhow::Error>,
        ticks: &mut mpsc::UnboundedReceiver<()>,
    ) -> Result<()> {
        let mut next = first;
        loop {
            let event = match next.take() {
                Some(event) => event,
                None => tokio::select! {
                    msg = messages.recv() => match msg.unwrap_or(Ok(None))? {
                        Some((msg, size)) => Event::Received(msg, size),
                        None => Event::HungUp,
                    },
                    // A task's failure is the session's once the greeting is over (only the
                    // writer runs before, and a failed Hello shows in what the peer answers).
                    Some(err) = failed.recv(), if self.phase != Phase::Greeting => return Err(err),
                    Some(()) = ticks.recv() => Event::Progressed,
                },
            };
            self.on(event)?;
            if self.phase == Phase::Done {
                return Ok(());
            }
        }
    }

    /// The one place where the session changes phase or ends: how it reacts to `event`.
    fn on(&mut self, event: Event) -> Result<()> {
        let session = self.session;
        match (self.phase, event) {
            (Phase::Done, _) => {}
            (Phase::Greeting, Event::HungUp) => {
                return Err(session.error_closed(Closed::BeforeHello).into())
            }
            (Phase::CatchingUp | Phase::Live, Event::HungUp) => match session.mode {
                Mode::Live => self.phase = Phase::Done,
                Mode::Once => return Err(session.error_closed(Closed::BeforeConverged).into()),
            },
            (Phase::Greeting, Event::Progressed) => {}
            (Phase::CatchingUp | Phase::Live, Event::Progressed) => {
                session.report(&self.shared);
                self.catch_up();
            }
            (Phase::Greeting, Event::Received(msg, size)) => {
                lock(&self.shared).stats.received_bytes += size as u64;
                match msg {
                    Message::Hello(hello) => {
                        self.greeted(&hello)?;
                        self.phase = Phase::CatchingUp;
                    }
                    Message::Refuse(reason) => {
                        return Err(session.error_refused(Stage::Hello, reason).into())
                    }
                    _ => return Err(session.error_protocol(Violation::FirstNotHello).into()),
                }
            }
            (Phase::CatchingUp | Phase::Live, Event::Received(msg, size)) => {
                lock(&self.shared).stats.received_bytes += size as u64;
                match msg {
                    Message::Changes(changes) => self.changes(changes)?,
                    Message::Applied { groups, heads } => {
                        self.applied(groups, &Coverage::from(&heads));
                        self.catch_up();
                        if self.phase == Phase::Done {
                            return Ok(());
                        }
                    }
                    Message::Want(digests) => self
                        .wants
                        .send(digests)
                        .map_err(|_| anyhow!("serving content stopped"))?,
                    Message::Content(c) => self
                        .content
                        .send(c)
                        .map_err(|_| anyhow!("applying stopped"))?,
                    Message::Refuse(reason) => {
                        return Err(session.error_refused(Stage::Session, reason).into())
                    }
                    Message::Hello(_) | Message::Join(_) | Message::Welcome { .. } => {
                        return Err(session
                            .error_protocol(Violation::Unexpected(msg.name()))
                            .into())
                    }
                }
                session.report(&self.shared);
            }
        }
        Ok(())
    }

    /// Leaves [`Phase::CatchingUp`] once both sides hold the same versions with nothing in
    /// flight: a one-off session is done, a live one goes on pushing local commits.
    fn catch_up(&mut self) {
        if self.phase == Phase::CatchingUp && converged(&self.shared) {
            self.phase = match self.session.mode {
                Mode::Once => Phase::Done,
                Mode::Live => {
                    tracing::debug!(peer = %self.session.peer_name, "caught up");
                    Phase::Live
                }
            };
        }
    }

    /// The peer's Hello: checked, its heads taken as what it holds, and the tasks started.
    fn greeted(&mut self, hello: &Hello) -> Result<(), Error> {
        self.session.check_hello(hello)?;
        lock(&self.shared).heard(&Coverage::from(&hello.heads));
        let Some(start) = self.start.take() else {
            return Ok(());
        };
        let session = self.session;
        let announcer = Announcer::new(self.shared.clone(), start.out.clone());
        self.tasks.extend([
            spawn_task(
                announce_loop(
                    announcer.clone(),
                    session.holdings.clone(),
                    start.tick.clone(),
                ),
                start.fail.clone(),
            ),
            spawn_task(
                export::export_loop(
                    start.exporter_db,
                    session.connect.clone(),
                    self.shared.clone(),
                    self.offers.clone(),
                    session.limits.clone(),
                    start.out.clone(),
                    start.acked,
                    session.holdings.watch(),
                    start.tick.clone(),
                ),
                start.fail.clone(),
            ),
            spawn_task(
                content::serve_content(
                    session.connect.clone(),
                    session.limits.content_idle,
                    self.shared.clone(),
                    self.offers.clone(),
                    start.out.clone(),
                    start.wants,
                ),
                start.fail.clone(),
            ),
            spawn_task(
                apply::apply_loop(
                    start.applier_db,
                    session.peer,
                    session.node,
                    self.shared.clone(),
                    content::Fetcher::new(
                        start.out.clone(),
                        start.content,
                        &session.limits,
                        session.node.now,
                    ),
                    session.holdings.clone(),
                    announcer,
                    start.groups,
                    start.tick,
                ),
                start.fail,
            ),
        ]);
        Ok(())
    }

    /// A piece of a group; the group's last one says which versions it completes.
    fn changes(&mut self, Changes { changes, complete }: Changes) -> Result<()> {
        let covers = complete.map(|h| Coverage::from(&h));
        {
            let mut s = lock(&self.shared);
            s.stats.received_changes += changes.len() as u64;
            s.mid_group = covers.is_none();
            if let Some(covers) = &covers {
                s.groups_received += 1;
                s.peer_known.union(covers);
                s.their_heads.union(covers);
            }
        }
        // Parts go to the applier at once, so it can fetch content while the rest of a large
        // group is still arriving.
        self.apply
            .send(Incoming { changes, covers })
            .map_err(|_| anyhow!("applying stopped"))
    }

    /// The peer applied `groups` of this side's groups, and holds `heads` too (besides what
    /// it said before).
    fn applied(&mut self, groups: u64, heads: &Coverage) {
        {
            let mut s = lock(&self.shared);
            s.heard(heads);
            s.groups_acked = s.groups_acked.max(groups);
        }
        self.offers.acknowledged(groups);
        self.acked.send_if_modified(|acked| {
            let more = groups > *acked;
            *acked = (*acked).max(groups);
            more
        });
    }
}

/// Tells the peer what this side came to hold and what it applied, in `Applied` messages,
/// sent only from here (by the applier and the announcer, one at a time, so that their
/// group counts never go back and an apply is announced once).
#[derive(Clone)]
pub(super) struct Announcer {
    shared: SharedRef,
    out: mpsc::Sender<Message>,
    /// The group count last sent; held while one is being sent.
    sent: Arc<tokio::sync::Mutex<u64>>,
}

impl Announcer {
    fn new(shared: SharedRef, out: mpsc::Sender<Message>) -> Announcer {
        Announcer {
            shared,
            out,
            sent: Arc::new(tokio::sync::Mutex::new(0)),
        }
    }

    /// Runs `then` (which may grow this node's holdings, or count an applied group), then
    /// sends an `Applied` if the peer has news: the groups applied, if more than last said,
    /// and whatever `holdings` now holds beyond what the peer was told (possibly nothing).
    pub(super) async fn announce(&self, holdings: &Holdings, then: impl FnOnce()) -> Result<()> {
        let mut sent = self.sent.lock().await;
        then();
        let held = holdings.now();
        let (groups, new) = {
            let mut s = lock(&self.shared);
            let new = held.minus(&s.told);
            s.told.union(&new);
            s.mine = held;
            s.stats.lag = versions_lacking(&s.mine, &s.their_heads);
            (s.groups_applied, new)
        };
        if groups == *sent && new.0.is_empty() {
            return Ok(());
        }
        tracing::debug!(
            groups,
            origins = new.0.len(),
            "telling the peer what this node holds"
        );
        self.out
            .send(Message::Applied {
                groups,
                heads: Heads::from(&new),
            })
            .await
            .map_err(|_| Error::Cancelled)?;
        *sent = groups;
        Ok(())
    }
}

/// Tells the peer whenever this node's [`Holdings`] grow (an apply by any session, a local
/// write, another process's merge) what this side holds beyond what the peer was told, so
/// that the peer's exporter skips what this node got another way.
async fn announce_loop(
    announcer: Announcer,
    holdings: Holdings,
    tick: mpsc::UnboundedSender<()>,
) -> Result<()> {
    let mut moved = holdings.watch();
    loop {
        moved.borrow_and_update();
        announcer.announce(&holdings, || {}).await?;
        // What this side holds moved: the sides may be converged.
        let _ = tick.send(());
        moved
            .changed()
            .await
            .map_err(|_| anyhow!("this node's holdings stopped"))?;
    }
}

fn spawn_task(
    fut: impl std::future::Future<Output = Result<()>> + Send + 'static,
    fail: mpsc::UnboundedSender<anyhow::Error>,
) -> JoinHandle<()> {
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
