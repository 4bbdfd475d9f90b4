//! App storage: key-value entries, documents and blobs that serverless code reads and writes
//! (`fazt.app.kv`, `.ds`, `.s3`), and per-app variables (`fazt.env`). Everything here lives
//! in replicated tables and is written through the replication engine, so it reaches peers.
//! How concurrent writes merge is described in docs/js-api.md ("Storage and replication").

pub mod docs;
pub mod env;
pub mod files;
pub mod kv;
pub mod logs;
pub mod quota;

use std::sync::Arc;

use anyhow::{bail, Result};

/// Most bytes one read call (`ds.find`, `kv.list`, `s3.list`, ...) returns, about: a call
/// that would return more fails and says to narrow the query or page with limit/offset.
/// Also the most document bytes one `ds.update` rewrites, and the ids one `ds.delete` holds.
pub const MAX_RESULT_BYTES: usize = 8 << 20;

/// What one call into storage may spend: it stops when the request's time is up (checked
/// between rows; SQLite's own loops are stopped by the worker's progress handler) and it
/// returns at most `max_bytes`.
#[derive(Clone)]
pub struct Budget {
    expired: Arc<dyn Fn() -> bool + Send + Sync>,
    pub max_bytes: usize,
}

impl Budget {
    pub fn new(expired: Arc<dyn Fn() -> bool + Send + Sync>) -> Budget {
        Budget {
            expired,
            max_bytes: MAX_RESULT_BYTES,
        }
    }

    /// No deadline (tests); the byte cap still holds.
    #[cfg(test)]
    pub fn untimed() -> Budget {
        Budget::new(Arc::new(|| false))
    }

    /// Fails once the request's time is up.
    pub fn check_time(&self) -> Result<()> {
        if (self.expired)() {
            bail!("the request ran out of time while using app storage");
        }
        Ok(())
    }

    /// Adds `n` bytes to `used`; fails beyond the cap, saying what to do about it (`what`
    /// is the start of the message: "ds.find would return").
    pub fn spend(&self, used: &mut usize, n: usize, what: &str) -> Result<()> {
        *used = used.saturating_add(n);
        if *used > self.max_bytes {
            bail!(
                "{what} more than {} MiB: narrow the query (or page with limit and offset)",
                self.max_bytes >> 20
            );
        }
        Ok(())
    }
}

/// Whose data a call touches: one app's shared data (`user_id` empty) or one user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub app_id: String,
    pub user_id: String,
}

impl Scope {
    pub fn app(app_id: &str) -> Scope {
        Scope {
            app_id: app_id.to_string(),
            user_id: String::new(),
        }
    }
}

/// An error as apps see it: SQLite stopped by the worker's progress handler means the
/// request's time is up.
pub(crate) fn explain(e: anyhow::Error) -> anyhow::Error {
    let stopped = e
        .chain()
        .filter_map(|c| c.downcast_ref::<rusqlite::Error>())
        .any(|r| r.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted));
    if stopped {
        anyhow::anyhow!("the request ran out of time while using app storage")
    } else {
        e
    }
}

/// Keys, collection names and paths: non-empty, at most 1 KiB, no NUL.
pub(crate) fn check_name(kind: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        bail!("{kind} must not be empty");
    }
    if s.len() > 1024 {
        bail!("{kind} is longer than 1024 bytes");
    }
    if s.contains('\0') {
        bail!("{kind} must not contain NUL characters");
    }
    Ok(())
}
