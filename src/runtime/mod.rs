//! Serverless apps: each app's `api/main.js` answers `/api` and `/api/*` on its hosts.
//!
//! Every app gets its own worker threads (one per core, sharing the app's queue), each owning
//! its own QuickJS runtime (its own heap, with its own memory cap), so apps never share state
//! and one app's busy loop never holds up another. Each request runs in a fresh context made
//! ahead of time: nothing but what the app stores survives from one request to the next.
//! Compiled bytecode is cached per app version in each worker; workers idle for a while exit
//! and free their memory. Console output goes to the app's log through one writer thread.

mod host;
pub mod request;
mod script;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::db::Database;

/// What an app's code may use.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Heap of one app's runtime.
    pub memory: usize,
    /// Time one request may run.
    pub time: Duration,
    /// Largest request body.
    pub body: usize,
    /// Requests waiting for a busy app beyond this are refused with 503.
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: 64 << 20,
            time: Duration::from_secs(5),
            body: 10 << 20,
            queue: 256,
        }
    }
}

/// One request for an app's code, as the HTTP side hands it over.
#[derive(Debug)]
pub struct Call {
    pub app_id: String,
    pub app_name: String,
    pub version: Arc<str>,
    pub method: String,
    /// The full URL (`http://host/api/x?y=1`).
    pub url: String,
    pub path: String,
    pub query: String,
    /// Lower-case names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// A multipart/form-data body, split on the HTTP side.
    pub multipart: Option<Result<request::Multipart, String>>,
}

/// The app's answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// A JSON error answer: `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::json!({ "error": message })
                .to_string()
                .into_bytes(),
        }
    }
}

struct Job {
    call: Call,
    queued: Instant,
    reply: tokio::sync::oneshot::Sender<Reply>,
}

/// The app workers of one server.
pub struct Runtimes {
    db: Database,
    limits: Limits,
    /// Worker threads per app (each with its own runtime), sharing the app's queue.
    per_app: usize,
    workers: Mutex<HashMap<String, std::sync::mpsc::SyncSender<Job>>>,
    logs: Mutex<std::sync::mpsc::Sender<worker::LogBatch>>,
}

impl Runtimes {
    pub fn new(db: Database, limits: Limits) -> Runtimes {
        let (logs, rx) = std::sync::mpsc::channel();
        let writer = db.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("fazt-app-logs".into())
            .spawn(move || worker::write_logs(writer, rx))
        {
            tracing::error!(error = %e, "cannot start the app log writer");
        }
        Runtimes {
            db,
            limits,
            per_app: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            workers: Mutex::new(HashMap::new()),
            logs: Mutex::new(logs),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `call` in its app's worker and waits for the answer.
    pub async fn call(&self, call: Call) -> Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let app_id = call.app_id.clone();
        let mut job = Job {
            call,
            queued: Instant::now(),
            reply: tx,
        };
        // A worker that exited (idle, or after a crash) is replaced once.
        for _ in 0..2 {
            let sender = self.worker(&app_id);
            match sender.try_send(job) {
                Ok(()) => {
                    return rx.await.unwrap_or_else(|_| {
                        Reply::error(500, "the app's runtime stopped while answering")
                    });
                }
                Err(std::sync::mpsc::TrySendError::Full(_)) => {
                    return Reply::error(503, "the app is busy: too many requests are waiting");
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(j)) => {
                    self.workers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&app_id);
                    job = j;
                }
            }
        }
        Reply::error(500, "the app's runtime could not be started")
    }

    fn worker(&self, app_id: &str) -> std::sync::mpsc::SyncSender<Job> {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = workers.get(app_id) {
            return s.clone();
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(self.limits.queue);
        let queue = Arc::new(Mutex::new(rx));
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for _ in 0..self.per_app {
            let (db, limits, id) = (self.db.clone(), self.limits.clone(), app_id.to_string());
            let (queue, logs) = (queue.clone(), logs.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("fazt-js-{}", &app_id[..app_id.len().min(12)]))
                .stack_size(8 << 20)
                .spawn(move || worker::run(id, db, limits, queue, logs));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start an app worker thread");
            }
        }
        workers.insert(app_id.to_string(), tx.clone());
        tx
    }
}
