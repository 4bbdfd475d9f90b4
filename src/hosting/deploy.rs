//! Deploying a directory as a new immutable version of an app.
//!
//! Two phases: `stage` reads and checks everything (names, paths, sizes, symlinks) without
//! touching the database, so bad input changes nothing; `commit` writes the content, the
//! version and the switch of the app's current version in one transaction, so a visitor
//! sees either the old version or the new one, never a mix.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::content;
use super::names::{AppId, AppName, ContentHash, Subdomain, VersionId};

/// A file read from the directory, ready to store.
struct StagedFile {
    hash: ContentHash,
    mime: String,
    data: Vec<u8>,
}

/// Everything a deploy will write, checked and in memory.
pub struct Staged {
    files: BTreeMap<String, StagedFile>,
    manifest: Manifest,
}

#[derive(Debug, Default, Deserialize)]
struct Manifest {
    name: Option<String>,
    spa: Option<bool>,
}

pub struct Limits {
    pub max_file_bytes: u64,
}

/// Reads `dir` into memory, skipping dotfiles, `node_modules`, `.git` and `.gitignore`
/// matches. Refuses a missing or empty directory, oversized files, non-UTF-8 names and
/// anything (symlinks included) that resolves outside `dir`.
pub fn stage(dir: &Path, limits: &Limits) -> Result<Staged> {
    let meta = std::fs::metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("directory {} does not exist", dir.display()),
        _ => anyhow!("cannot read {}: {e}", dir.display()),
    })?;
    if !meta.is_dir() {
        bail!(
            "{} is not a directory: deploy a directory holding index.html",
            dir.display()
        );
    }
    let root = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;

    let walker = ignore::WalkBuilder::new(&root)
        .hidden(true)
        .parents(false)
        .ignore(false)
        .git_ignore(true)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .follow_links(true)
        .filter_entry(|e| e.file_name() != "node_modules")
        .build();

    let mut files = BTreeMap::new();
    for entry in walker {
        let entry = entry.map_err(|e| anyhow!("reading {}: {e}", dir.display()))?;
        let Some(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            continue;
        }
        let path = entry.path();
        let rel = relative_path(&root, path)?;
        let real = path
            .canonicalize()
            .with_context(|| format!("{rel}: cannot resolve (broken symlink?)"))?;
        if !real.starts_with(&root) {
            bail!(
                "{rel} resolves to {}, outside {}: copy the file into the directory instead of linking it",
                real.display(),
                dir.display()
            );
        }
        let meta = std::fs::metadata(&real).with_context(|| format!("reading {rel}"))?;
        if !meta.is_file() {
            bail!("{rel} is not a regular file");
        }
        if meta.len() > limits.max_file_bytes {
            bail!(
                "{rel} is {} bytes, over the {}-byte file limit (raise it with `fazt server set-config --max-file-size`)",
                meta.len(),
                limits.max_file_bytes
            );
        }
        let data = std::fs::read(&real).with_context(|| format!("reading {rel}"))?;
        if data.len() as u64 > limits.max_file_bytes {
            bail!("{rel} grew past the file limit while being read");
        }
        let mime = crate::content_type::mime_for(&rel);
        files.insert(
            rel,
            StagedFile {
                hash: ContentHash::of(&data),
                mime,
                data,
            },
        );
    }
    if files.is_empty() {
        bail!(
            "{} has no files to deploy (dotfiles, node_modules and .gitignore matches are skipped)",
            dir.display()
        );
    }
    let manifest = match files.get("manifest.json") {
        Some(f) => serde_json::from_slice::<Manifest>(&f.data)
            .map_err(|e| anyhow!("manifest.json is not valid: {e}"))?,
        None => Manifest::default(),
    };
    Ok(Staged { files, manifest })
}

/// `path` relative to `root`, '/'-separated; refuses names that cannot be served.
fn relative_path(root: &Path, path: &Path) -> Result<String> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| anyhow!("{} is outside {}", path.display(), root.display()))?;
    let mut parts = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => {
                let part = part
                    .to_str()
                    .ok_or_else(|| anyhow!("{}: file names must be UTF-8", rel.display()))?;
                if part.contains('\\') {
                    bail!("{}: file names must not contain '\\'", rel.display());
                }
                parts.push(part);
            }
            _ => bail!("{}: unexpected path component", rel.display()),
        }
    }
    Ok(parts.join("/"))
}

impl Staged {
    /// The app name: `--name`, else manifest.json's `name`, else the directory's name.
    pub fn app_name(&self, flag: Option<&str>, dir: &Path) -> Result<AppName> {
        if let Some(name) = flag {
            return AppName::parse(name);
        }
        if let Some(name) = &self.manifest.name {
            return AppName::parse(name).context("manifest.json's name");
        }
        let dir_name = dir_name(dir).ok_or_else(|| {
            anyhow!(
                "cannot take an app name from {}: pass --name",
                dir.display()
            )
        })?;
        AppName::parse(&dir_name).context("the directory name (pass --name to choose another)")
    }

    /// Whether manifest.json names the app.
    pub fn manifest_names_app(&self) -> bool {
        self.manifest.name.is_some()
    }

    pub fn spa(&self, flag: bool) -> bool {
        flag || self.manifest.spa.unwrap_or(false)
    }

    /// A digest of the file set, used to derive the version id.
    fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (path, f) in &self.files {
            h.update(path.as_bytes());
            h.update([0]);
            h.update(f.hash.as_str().as_bytes());
        }
        hex::encode(h.finalize())
    }
}

#[derive(Debug, Serialize)]
pub struct DeployReport {
    pub app: AppName,
    pub app_id: AppId,
    pub version: VersionId,
    pub number: i64,
    pub files: usize,
    pub bytes: u64,
    /// Files whose content the database did not hold yet.
    pub new_blobs: usize,
    pub spa: bool,
    /// The alias created for a new app, if any.
    pub alias: Option<Subdomain>,
    /// Set when the app's name was taken as a subdomain by another app.
    pub alias_taken: bool,
}

/// The last component of a deploy directory's real path, as UTF-8.
pub fn dir_name(dir: &Path) -> Option<String> {
    let base: PathBuf = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    base.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
}

/// Writes a staged deploy as a new version and makes it current, atomically.
pub fn commit(
    db: &mut crate::db::Db,
    name: &AppName,
    spa: bool,
    staged: Staged,
) -> Result<DeployReport> {
    let app_id = name.derive_id();
    let now = crate::clock::now_secs();
    // Nanoseconds plus the node's randomness keep ids distinct even for identical redeploys.
    let mut salt = [0u8; 8];
    getrandom::fill(&mut salt).map_err(|e| anyhow!("no randomness: {e}"))?;
    let version = VersionId(
        hex::encode(Sha256::digest(
            format!("{}:{}:{}", app_id, staged.digest(), hex::encode(salt)).as_bytes(),
        ))[..12]
            .to_string(),
    );

    db.write(|tx| {
    let existing: Option<String> =
        tx.query_row("SELECT name FROM apps WHERE id = ?1", [&app_id.0], |r| r.get(0)).optional()?;
    let mut alias = None;
    let mut alias_taken = false;
    if existing.is_none() {
        tx.execute(
            "INSERT INTO apps (id, name, current_version, created_at, updated_at) VALUES (?1, ?2, '', ?3, ?3)",
            params![app_id.0, name.as_str(), now],
        )?;
        let sub = Subdomain::from(name);
        let holder: Option<String> = tx
            .query_row("SELECT app_id FROM aliases WHERE subdomain = ?1", [sub.as_str()], |r| r.get(0))
            .optional()?;
        match holder {
            None => {
                tx.execute(
                    "INSERT INTO aliases (subdomain, app_id, updated_at) VALUES (?1, ?2, ?3)",
                    params![sub.as_str(), app_id.0, now],
                )?;
                alias = Some(sub);
            }
            Some(other) if other != app_id.0 => alias_taken = true,
            Some(_) => {}
        }
    }
    let number: i64 = tx.query_row(
        "SELECT coalesce(max(number), 0) + 1 FROM versions WHERE app_id = ?1",
        [&app_id.0],
        |r| r.get(0),
    )?;

    let mut new_blobs = 0;
    let mut bytes = 0u64;
    {
        let mut has_blob = tx.prepare("SELECT 1 FROM blobs WHERE hash = ?1")?;
        let mut put_blob = tx.prepare("INSERT INTO blobs (hash, size, data, gzip, br) VALUES (?1, ?2, ?3, ?4, ?5)")?;
        let mut put_file = tx.prepare(
            "INSERT INTO version_files (version_id, path, hash, size, mime) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (path, file) in &staged.files {
            bytes += file.data.len() as u64;
            if !has_blob.exists([file.hash.as_str()])? {
                let variants = content::compress(&file.data, &file.mime);
                put_blob.execute(params![
                    file.hash.as_str(),
                    file.data.len() as i64,
                    file.data,
                    variants.gzip,
                    variants.br
                ])?;
                new_blobs += 1;
            }
            put_file.execute(params![version.0, path, file.hash.as_str(), file.data.len() as i64, file.mime])?;
        }
    }
    tx.execute(
        "INSERT INTO versions (id, app_id, number, spa, file_count, total_bytes, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![version.0, app_id.0, number, spa, staged.files.len() as i64, bytes as i64, now],
    )?;
    tx.execute(
        "UPDATE apps SET current_version = ?1, updated_at = ?2 WHERE id = ?3",
        params![version.0, now, app_id.0],
    )?;

    Ok(DeployReport {
        app: name.clone(),
        app_id,
        version,
        number,
        files: staged.files.len(),
        bytes,
        new_blobs,
        spa,
        alias,
        alias_taken,
    })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_file_bytes: 1 << 20,
        }
    }

    #[test]
    fn skips_hidden_files_node_modules_and_gitignored_paths() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("index.html"), "hi").unwrap();
        std::fs::write(d.join(".env"), "secret").unwrap();
        std::fs::create_dir_all(d.join(".git")).unwrap();
        std::fs::write(d.join(".git/config"), "x").unwrap();
        std::fs::create_dir_all(d.join("node_modules/pkg")).unwrap();
        std::fs::write(d.join("node_modules/pkg/index.js"), "x").unwrap();
        std::fs::write(d.join(".gitignore"), "*.log\nbuild-cache/\n").unwrap();
        std::fs::write(d.join("debug.log"), "x").unwrap();
        std::fs::create_dir_all(d.join("build-cache")).unwrap();
        std::fs::write(d.join("build-cache/a"), "x").unwrap();
        std::fs::create_dir_all(d.join("docs")).unwrap();
        std::fs::write(d.join("docs/index.html"), "docs").unwrap();
        let staged = stage(d, &limits()).unwrap();
        let paths: Vec<&str> = staged.files.keys().map(String::as_str).collect();
        assert_eq!(paths, ["docs/index.html", "index.html"]);
    }

    #[test]
    fn refuses_symlinks_that_escape() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("passwd"), "root").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.html"), "hi").unwrap();
        std::os::unix::fs::symlink(outside.path().join("passwd"), dir.path().join("leak.txt"))
            .unwrap();
        let err = stage(dir.path(), &limits()).err().unwrap().to_string();
        assert!(err.contains("outside"), "{err}");
    }

    #[test]
    fn follows_symlinks_that_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.html"), "hi").unwrap();
        std::os::unix::fs::symlink(dir.path().join("index.html"), dir.path().join("home.html"))
            .unwrap();
        let staged = stage(dir.path(), &limits()).unwrap();
        assert_eq!(staged.files.len(), 2);
    }

    #[test]
    fn refuses_oversized_files_and_empty_directories() {
        let dir = tempfile::tempdir().unwrap();
        assert!(stage(dir.path(), &limits())
            .err()
            .unwrap()
            .to_string()
            .contains("no files"));
        std::fs::write(dir.path().join("big.bin"), vec![0u8; 2 << 20]).unwrap();
        assert!(stage(dir.path(), &limits())
            .err()
            .unwrap()
            .to_string()
            .contains("file limit"));
    }

    #[test]
    fn name_comes_from_flag_then_manifest_then_directory() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("my-site");
        std::fs::create_dir(&site).unwrap();
        std::fs::write(site.join("index.html"), "hi").unwrap();
        let staged = stage(&site, &limits()).unwrap();
        assert_eq!(staged.app_name(None, &site).unwrap().as_str(), "my-site");
        assert_eq!(
            staged.app_name(Some("flag"), &site).unwrap().as_str(),
            "flag"
        );
        std::fs::write(
            site.join("manifest.json"),
            r#"{"name":"from-manifest","spa":true}"#,
        )
        .unwrap();
        let staged = stage(&site, &limits()).unwrap();
        assert_eq!(
            staged.app_name(None, &site).unwrap().as_str(),
            "from-manifest"
        );
        assert!(staged.spa(false));
        std::fs::write(site.join("manifest.json"), "{not json").unwrap();
        assert!(stage(&site, &limits())
            .err()
            .unwrap()
            .to_string()
            .contains("manifest.json"));
    }
}
