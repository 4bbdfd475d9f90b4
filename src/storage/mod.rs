//! App storage: key-value entries, documents and blobs that serverless code reads and writes
//! (`fazt.app.kv`, `.ds`, `.s3`), and per-app variables (`fazt.env`). Everything here lives
//! in replicated tables and is written through the replication engine, so it reaches peers.
//! How concurrent writes merge is described in docs/js-api.md ("Storage and replication").

pub mod docs;
pub mod env;
pub mod files;
pub mod kv;
pub mod logs;

use anyhow::{bail, Result};

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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
