//! What the server knows about the sites it serves, kept in memory and refreshed when the
//! database changes.
//!
//! Versions and content are immutable, so their cached forms never go stale. What changes
//! is small: which version is current, where aliases point. Before answering a request the
//! server asks the database's commit watcher whether anyone has committed since it last
//! looked ([`Database::check_commits`], a read of shared memory); if so, it reloads the
//! routing table when the replicated state moved since the last load, so a deploy or rollback
//! from the CLI is served by the very next request. Everything routing reads (apps, aliases,
//! versions) replicates, so commits of node-local bookkeeping (peer figures, app logs) reload
//! nothing; nor do merges of changes this node already held. Whether the state moved is the
//! watcher's answer when it already read the fingerprint after the commit, else read on a
//! blocking thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use axum::http::HeaderValue;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension};

use super::content;
use crate::db::{Counts, Database};

/// Total bytes of file content kept in memory.
const BLOB_CACHE_BYTES: u64 = 128 << 20;
/// Larger files are read from the database on each request instead of being cached.
const BLOB_CACHE_MAX_ITEM: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Identity,
    Gzip,
    Brotli,
}

impl Encoding {
    fn column(self) -> &'static str {
        match self {
            Encoding::Identity => "data",
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
        }
    }

    pub fn header(self) -> Option<HeaderValue> {
        match self {
            Encoding::Identity => None,
            Encoding::Gzip => Some(HeaderValue::from_static("gzip")),
            Encoding::Brotli => Some(HeaderValue::from_static("br")),
        }
    }
}

/// Where a request's host leads.
#[derive(Debug, Clone)]
pub struct Route {
    pub version: Arc<str>,
    pub spa: bool,
    pub app_id: Arc<str>,
    pub app_name: Arc<str>,
}

/// One file of a version, with its response headers prepared.
pub struct FileEntry {
    pub hash: Arc<str>,
    pub size: u64,
    pub content_type: HeaderValue,
    pub cache_control: HeaderValue,
    pub etag: HeaderValue,
    pub etag_gzip: Option<HeaderValue>,
    pub etag_br: Option<HeaderValue>,
}

impl FileEntry {
    pub fn has_variants(&self) -> bool {
        self.etag_gzip.is_some() || self.etag_br.is_some()
    }

    /// The strong ETag of one representation: each encoding is a different one.
    pub fn etag_for(&self, enc: Encoding) -> &HeaderValue {
        match enc {
            Encoding::Identity => &self.etag,
            Encoding::Gzip => self.etag_gzip.as_ref().unwrap_or(&self.etag),
            Encoding::Brotli => self.etag_br.as_ref().unwrap_or(&self.etag),
        }
    }
}

pub type Manifest = HashMap<String, Arc<FileEntry>>;

pub struct Site {
    db: Database,
    /// The watcher's commit count when `routes` was last known current (0: never).
    loaded: AtomicU64,
    /// The watcher's replicated count when `routes` was loaded (`None`: never); held while
    /// the routes are checked and reloaded, so that concurrent requests do it once.
    reloading: tokio::sync::Mutex<Option<u64>>,
    /// How many times the routes were loaded (for tests and measurements).
    reloads: AtomicU64,
    routes: RwLock<Arc<HashMap<String, Route>>>,
    manifests: Mutex<HashMap<Arc<str>, Arc<Manifest>>>,
    blobs: quick_cache::sync::Cache<(Arc<str>, Encoding), Bytes, BlobWeight>,
}

#[derive(Clone)]
struct BlobWeight;

impl quick_cache::Weighter<(Arc<str>, Encoding), Bytes> for BlobWeight {
    fn weight(&self, _key: &(Arc<str>, Encoding), val: &Bytes) -> u64 {
        val.len() as u64 + 64
    }
}

impl Site {
    pub fn new(db: Database) -> Site {
        Site {
            db,
            loaded: AtomicU64::new(0),
            reloading: tokio::sync::Mutex::new(None),
            reloads: AtomicU64::new(0),
            routes: RwLock::new(Arc::new(HashMap::new())),
            manifests: Mutex::new(HashMap::new()),
            blobs: quick_cache::sync::Cache::with_weighter(4096, BLOB_CACHE_BYTES, BlobWeight),
        }
    }

    /// The alias table as of the latest commit to the database.
    pub async fn routes(&self) -> Result<Arc<HashMap<String, Route>>> {
        let latest = self.db.check_commits()?;
        if self.loaded.load(Ordering::Acquire) < latest {
            let mut loaded = self.reloading.lock().await;
            if self.loaded.load(Ordering::Acquire) < latest {
                let now = match self.db.replicated_known() {
                    Some(now) if now.commits >= latest => now,
                    _ => {
                        let db = self.db.clone();
                        tokio::task::spawn_blocking(move || db.replicated_now_blocking())
                            .await
                            .context("a database read stopped")??
                    }
                };
                if *loaded != Some(now.replicated) {
                    self.reload().await?;
                    *loaded = Some(now.replicated);
                }
                // Loaded (or found current) after the watcher counted `now`, so the routes
                // hold every commit it counts (and maybe later ones, which only cost a
                // reload too many).
                let Counts { commits, .. } = now;
                self.loaded.store(commits, Ordering::Release);
            }
        }
        Ok(self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }

    async fn reload(&self) -> Result<()> {
        let routes = Arc::new(self.db.read(load_routes).await?);
        self.manifests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|v, _| routes.values().any(|r| &r.version == v));
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = routes;
        self.reloads.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("routes reloaded");
        Ok(())
    }

    /// How many times the routing table was loaded since the server started.
    #[cfg(test)]
    fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// The files of a version (immutable, so cached until the version stops being served).
    pub async fn manifest(&self, version: &Arc<str>) -> Result<Arc<Manifest>> {
        if let Some(m) = self
            .manifests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(version)
        {
            return Ok(m.clone());
        }
        let v = version.clone();
        let manifest = self
            .db
            .read(move |conn| load_manifest(conn, &v))
            .await
            .context("loading a version's file list")?;
        let manifest = Arc::new(manifest);
        self.manifests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(version.clone(), manifest.clone());
        Ok(manifest)
    }

    /// A file's bytes in one encoding.
    pub async fn content(&self, hash: &Arc<str>, enc: Encoding) -> Result<Bytes> {
        let key = (hash.clone(), enc);
        if let Some(bytes) = self.blobs.get(&key) {
            return Ok(bytes);
        }
        let h = hash.clone();
        let bytes = self
            .db
            .read(move |conn| {
                let sql = format!("SELECT {} FROM blobs WHERE hash = ?1", enc.column());
                let data: Option<Option<Vec<u8>>> = conn
                    .prepare_cached(&sql)?
                    .query_row([&*h], |r| r.get(0))
                    .optional()?;
                data.flatten()
                    .map(Bytes::from)
                    .ok_or_else(|| anyhow::anyhow!("content {h} is missing from the database"))
            })
            .await
            .context("reading file content")?;
        if bytes.len() <= BLOB_CACHE_MAX_ITEM {
            self.blobs.insert(key, bytes.clone());
        }
        Ok(bytes)
    }
}

fn load_routes(conn: &Connection) -> Result<HashMap<String, Route>> {
    let mut stmt = conn.prepare_cached(
        "SELECT a.subdomain, v.id, v.spa, p.id, p.name FROM aliases a
         JOIN apps p ON p.id = a.app_id
         JOIN versions v ON v.id = p.current_version",
    )?;
    let rows = stmt.query_map([], |r| {
        let sub: String = r.get(0)?;
        let version: String = r.get(1)?;
        let app_id: String = r.get(3)?;
        let app_name: String = r.get(4)?;
        Ok((
            sub,
            Route {
                version: version.into(),
                spa: r.get(2)?,
                app_id: app_id.into(),
                app_name: app_name.into(),
            },
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn load_manifest(conn: &Connection, version: &str) -> Result<Manifest> {
    let mut stmt = conn.prepare_cached(
        "SELECT f.path, f.hash, f.size, f.mime, b.gzip IS NOT NULL, b.br IS NOT NULL
         FROM version_files f LEFT JOIN blobs b ON b.hash = f.hash WHERE f.version_id = ?1",
    )?;
    let rows = stmt.query_map([version], |r| {
        let path: String = r.get(0)?;
        let hash: String = r.get(1)?;
        let size: i64 = r.get(2)?;
        let mime: String = r.get(3)?;
        let gzip: bool = r.get(4)?;
        let br: bool = r.get(5)?;
        Ok((path, hash, size, mime, gzip, br))
    })?;
    let mut files = HashMap::new();
    for row in rows {
        let (path, hash, size, mime, gzip, br) = row?;
        let etag = |suffix: &str| HeaderValue::from_str(&format!("\"{hash}{suffix}\"")).ok();
        let entry = FileEntry {
            etag: etag("").context("stored hash is not a valid header")?,
            etag_gzip: gzip.then(|| etag("-gz")).flatten(),
            etag_br: br.then(|| etag("-br")).flatten(),
            content_type: HeaderValue::from_str(&mime)
                .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream")),
            cache_control: HeaderValue::from_static(content::cache_control(&path)),
            size: size as u64,
            hash: hash.into(),
        };
        files.insert(path, Arc::new(entry));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::db::Db;

    /// Points `sub` at the app `blog` serving `version` (a replicated write, as a deploy or
    /// `alias link` makes).
    fn serve(w: &mut Db, sub: &str, version: &str) {
        w.write(|tx| {
            tx.execute(
                "INSERT INTO versions (id, app_id) VALUES (?1, 'app-blog')
                 ON CONFLICT (id) DO NOTHING",
                [version],
            )?;
            tx.execute(
                "INSERT INTO apps (id, name, current_version) VALUES ('app-blog', 'blog', ?1)
                 ON CONFLICT (id) DO UPDATE SET current_version = excluded.current_version",
                [version],
            )?;
            tx.execute(
                "INSERT INTO aliases (subdomain, app_id) VALUES (?1, 'app-blog')
                 ON CONFLICT (subdomain) DO NOTHING",
                [sub],
            )?;
            Ok::<_, rusqlite::Error>(())
        })
        .unwrap();
    }

    fn version_of(routes: &HashMap<String, Route>, sub: &str) -> Option<String> {
        routes.get(sub).map(|r| r.version.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routes_reload_when_replicated_state_moves_and_not_for_bookkeeping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        crate::db::create(&path).unwrap();
        // The watcher never polls within the test: what a request sees, it found itself.
        let db = Database::open_polling_every(&path, Duration::from_secs(3600)).unwrap();
        let _watching = db.commits();
        let site = Site::new(db.clone());
        assert!(site.routes().await.unwrap().is_empty());
        assert_eq!(site.reloads(), 1);

        // Node-local commits, synced or not, through the handle and on a connection of its
        // own (as another process makes): nothing to reload.
        for i in 0..3 {
            let key = format!("local-{i}");
            db.write(move |w| crate::config::set_local(w.conn(), &key, "x"))
                .await
                .unwrap();
            site.routes().await.unwrap();
            db.write_local(move |w| crate::config::set_local(w.conn(), "figures", "y"))
                .await
                .unwrap();
            site.routes().await.unwrap();
        }
        let other = db.engine().unwrap();
        crate::config::set_local(other.conn(), "other", "z").unwrap();
        site.routes().await.unwrap();
        assert_eq!(site.reloads(), 1, "node-local commits reloaded the routes");

        // A replicated write from another connection, unannounced (a CLI deploy): the very
        // next request routes it.
        let mut other = other;
        serve(&mut other, "blog", "v1");
        let routes = site.routes().await.unwrap();
        assert_eq!(version_of(&routes, "blog").as_deref(), Some("v1"));
        assert_eq!(site.reloads(), 2);
        // And one through the handle (which pokes the watcher: whether it or the request
        // reads the fingerprint first, the answer is the same).
        db.write(|w| {
            serve(w, "www", "v2");
            Ok(())
        })
        .await
        .unwrap();
        let routes = site.routes().await.unwrap();
        assert_eq!(version_of(&routes, "www").as_deref(), Some("v2"));
        assert_eq!(version_of(&routes, "blog").as_deref(), Some("v2"));
        assert_eq!(site.reloads(), 3);
        // Asking again with nothing committed reloads nothing.
        site.routes().await.unwrap();
        assert_eq!(site.reloads(), 3);
    }
}
