//! Exporting and importing change bundles (the format is defined in fazt-proto).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use fazt_proto::bundle::{self, BundleReader, BundleWriter, Record, SigningKey, Verified};
use fazt_proto::change::{WireChange, WireValue};

use crate::changes::Change;
use crate::clock::{CausalLength, ColVersion, DbVersion, Seq};
use crate::coverage::{Coverage, SiteId};
use crate::merge::ApplyReport;
use crate::replica::Replica;
use crate::value::Value;
use crate::Error;

/// Changes applied per SQLite transaction during an import (so that an interrupted import
/// keeps most of its work)...
const IMPORT_BATCH: usize = 20_000;
/// ... or fewer, once they carry this many bytes of keys and values. A single origin
/// transaction is never split between SQLite transactions; the bundle format bounds it
/// ([`bundle::MAX_TXN_CHANGES`], [`bundle::MAX_TXN_BYTES`]).
const IMPORT_BATCH_BYTES: usize = 64 << 20;
/// Changes held in memory at once during an import: a larger origin transaction is merged
/// part by part inside its SQLite transaction, so memory does not grow with its size.
pub const IMPORT_PART: usize = 4_096;
/// ... or fewer, once they carry this many bytes of keys and values (one larger value is
/// held alone).
pub const IMPORT_PART_BYTES: usize = 8 << 20;

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Changes written.
    pub changes: u64,
    /// Bytes written.
    pub bytes: u64,
    /// What the bundle completes, per origin.
    pub covers: Coverage,
}

impl Change {
    /// The change in fazt-proto's representation (bundles and the peer protocol).
    pub fn to_wire(&self) -> WireChange {
        to_wire(self)
    }

    /// The change from fazt-proto's representation (its bounds were checked at decode).
    pub fn from_wire(w: WireChange) -> Change {
        from_wire(w)
    }
}

fn to_wire(c: &Change) -> WireChange {
    WireChange {
        table: c.table.clone(),
        pk: c.pk.clone(),
        cid: c.cid.clone(),
        val: match &c.val {
            Value::Null => WireValue::Null,
            Value::Integer(i) => WireValue::Integer(*i),
            Value::Real(f) => WireValue::Real(*f),
            Value::Text(t) => WireValue::Text(t.clone()),
            Value::Blob(b) => WireValue::Blob(b.clone()),
        },
        col_version: c.col_version.0,
        db_version: c.db_version.0,
        site: c.site_id.0,
        cl: c.cl.0,
        seq: c.seq.0,
    }
}

fn from_wire(c: WireChange) -> Change {
    Change {
        table: c.table,
        pk: c.pk,
        cid: c.cid,
        val: match c.val {
            WireValue::Null => Value::Null,
            WireValue::Integer(i) => Value::Integer(i),
            WireValue::Real(f) => Value::Real(f),
            WireValue::Text(t) => Value::Text(t),
            WireValue::Blob(b) => Value::Blob(b),
        },
        col_version: ColVersion(c.col_version),
        db_version: DbVersion(c.db_version),
        site_id: SiteId(c.site),
        cl: CausalLength(c.cl),
        seq: Seq(c.seq),
    }
}

impl Replica {
    /// Streams everything a holder of `have` lacks into a bundle signed with `key` (the
    /// node's key). Fails, writing no complete bundle, if the changes exceed a limit the
    /// bundle format sets (an importer would refuse them).
    pub fn export_bundle<W: Write>(
        &self,
        have: &Coverage,
        key: &SigningKey,
        out: W,
    ) -> Result<ExportReport, Error> {
        let mut writer = BundleWriter::new(out, self.site_id.0, key)?;
        let mut changes = 0;
        let covers = self.changes_since(have, |c| {
            writer.change(&to_wire(&c))?;
            changes += 1;
            Ok(())
        })?;
        for (site, set) in &covers.0 {
            for &(start, end) in set.ranges() {
                writer.cover(site.0, start.0, end.0)?;
            }
        }
        let (_, bytes) = writer.finish()?;
        Ok(ExportReport {
            changes,
            bytes,
            covers,
        })
    }

    /// Writes a bundle file atomically: a temporary file renamed into place once complete.
    /// The file is owner-only (0600) whatever the umask: a bundle holds replicated data,
    /// apps' environment values included. The temporary file is made afresh (a file or
    /// symlink left at its name is removed, never written through).
    pub fn export_bundle_file(
        &self,
        have: &Coverage,
        key: &SigningKey,
        path: &Path,
    ) -> Result<ExportReport, Error> {
        let tmp = path.with_extension("partial");
        let result = (|| {
            let file = private_file(&tmp)?;
            let report = self.export_bundle(have, key, BufWriter::new(&file))?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(report)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Imports a bundle file. The whole file is read and checked (format, limits, checksum,
    /// signature) before anything is applied, so a truncated, corrupt, forged or foreign
    /// file changes nothing; `accept` then decides whether to trust the signer it names
    /// (`None`: an unsigned bundle) and nothing is applied unless it returns Ok. While it is
    /// checked, the file is copied to a private spool file next to the database and applied
    /// from there, so the bytes applied are the bytes checked even if someone rewrites the
    /// file meanwhile. Then it is applied in bounded batches, each one SQLite transaction
    /// and never splitting an origin transaction; the coverage it brings is recorded with
    /// the last one. Interrupted at any point, the database is consistent and importing the
    /// same file again completes it. Importing twice changes nothing.
    pub fn import_bundle_file<E: From<Error>>(
        &mut self,
        path: &Path,
        accept: impl FnOnce(&Verified) -> Result<(), E>,
    ) -> Result<ApplyReport, E> {
        let spool_path = self.conn.path().filter(|p| !p.is_empty()).map(|db| {
            let mut p = PathBuf::from(db).into_os_string();
            p.push(".import-spool");
            PathBuf::from(p)
        });
        let result = (|| {
            let mut spool = match &spool_path {
                Some(p) => Some(private_file(p).map_err(Error::from)?),
                None => None,
            };
            let verified = {
                let input = BufReader::new(File::open(path).map_err(Error::from)?);
                match spool.as_mut() {
                    Some(file) => {
                        let mut tee = Tee {
                            input,
                            copy: BufWriter::new(&*file),
                        };
                        let v = bundle::verify(&mut tee).map_err(Error::from)?;
                        tee.copy.flush().map_err(Error::from)?;
                        v
                    }
                    None => bundle::verify(input).map_err(Error::from)?,
                }
            };
            accept(&verified)?;
            let reader: Box<dyn Read> = match spool {
                Some(mut file) => {
                    file.rewind().map_err(Error::from)?;
                    Box::new(BufReader::new(file))
                }
                None => Box::new(BufReader::new(File::open(path).map_err(Error::from)?)),
            };
            Ok(self.import_checked(reader)?)
        })();
        if let Some(p) = &spool_path {
            let _ = std::fs::remove_file(p);
        }
        result
    }

    fn import_checked(&mut self, input: impl Read) -> Result<ApplyReport, Error> {
        let mut reader = BundleReader::new(input)?;
        let mut total = ApplyReport::default();
        let mut covers = Coverage::default();
        let mut merge = self.begin_merge()?;
        // The changes in memory, not merged yet, and their bytes.
        let mut part: Vec<Change> = Vec::new();
        let mut part_bytes = 0usize;
        // What the open SQLite transaction has taken so far (the part included).
        let (mut txn_changes, mut txn_bytes) = (0usize, 0usize);
        // The origin transaction of the last change read.
        let mut last: Option<(SiteId, DbVersion)> = None;
        while let Some(record) = reader.next_record()? {
            match record {
                Record::Change(c) => {
                    let c = from_wire(c);
                    let group = (c.site_id, c.db_version);
                    let boundary = last.is_some_and(|l| l != group);
                    last = Some(group);
                    if boundary && (txn_changes >= IMPORT_BATCH || txn_bytes >= IMPORT_BATCH_BYTES)
                    {
                        merge.part(&part)?;
                        part.clear();
                        part_bytes = 0;
                        add(
                            &mut total,
                            merge.commit(&Coverage::default(), DbVersion(0))?,
                        );
                        merge = self.begin_merge()?;
                        (txn_changes, txn_bytes) = (0, 0);
                    } else if part.len() >= IMPORT_PART || part_bytes >= IMPORT_PART_BYTES {
                        merge.part(&part)?;
                        part.clear();
                        part_bytes = 0;
                    }
                    let size = change_bytes(&c);
                    part_bytes = part_bytes.saturating_add(size);
                    txn_bytes = txn_bytes.saturating_add(size);
                    txn_changes += 1;
                    part.push(c);
                }
                Record::Cover { site, start, end } => {
                    covers.insert(SiteId(site), DbVersion(start), DbVersion(end))
                }
            }
        }
        merge.part(&part)?;
        add(&mut total, merge.commit(&covers, DbVersion(0))?);
        Ok(total)
    }
}

/// Bytes of a change's key and value (what dominates a batch's memory).
fn change_bytes(c: &Change) -> usize {
    c.pk.len()
        + match &c.val {
            Value::Text(t) => t.len(),
            Value::Blob(b) => b.len(),
            _ => 8,
        }
}

/// A new file only this user can read (a stale one from an interrupted import is
/// replaced; an existing link is removed, never followed).
fn private_file(path: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Copies what is read from `input` into `copy`.
struct Tee<R, W> {
    input: R,
    copy: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

fn add(total: &mut ApplyReport, r: ApplyReport) {
    crate::merge::add_report(total, &r);
}
