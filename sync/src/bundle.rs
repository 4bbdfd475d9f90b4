//! Exporting and importing change bundles (the format is defined in fazt-proto).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use fazt_proto::bundle::{self, BundleReader, BundleWriter, Record, WireChange, WireValue};

use crate::changes::{Batch, Change};
use crate::coverage::{Coverage, SiteId};
use crate::merge::ApplyReport;
use crate::replica::Replica;
use crate::value::Value;
use crate::Error;

/// Changes applied per SQLite transaction during an import (bounded memory).
const IMPORT_BATCH: usize = 20_000;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    pub changes: u64,
    pub bytes: u64,
    /// What the bundle completes, per origin.
    pub covers: Coverage,
}

impl Change {
    /// The change in fazt-proto's representation (bundles and the peer protocol).
    pub fn to_wire(&self) -> WireChange {
        to_wire(self)
    }

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
        col_version: c.col_version,
        db_version: c.db_version,
        site: c.site_id.0,
        cl: c.cl,
        seq: c.seq,
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
        col_version: c.col_version,
        db_version: c.db_version,
        site_id: SiteId(c.site),
        cl: c.cl,
        seq: c.seq,
    }
}

impl Replica {
    /// Streams everything a holder of `have` lacks into a bundle.
    pub fn export_bundle<W: Write>(&self, have: &Coverage, out: W) -> Result<ExportReport, Error> {
        let mut writer = BundleWriter::new(out, self.site_id.0)?;
        let mut changes = 0;
        let covers = self.changes_since(have, |c| {
            writer.change(&to_wire(&c))?;
            changes += 1;
            Ok(())
        })?;
        for (site, set) in &covers.0 {
            for &(start, end) in set.ranges() {
                writer.cover(site.0, start, end)?;
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
    pub fn export_bundle_file(&self, have: &Coverage, path: &Path) -> Result<ExportReport, Error> {
        let tmp = path.with_extension("partial");
        let result = (|| {
            use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            let report = self.export_bundle(have, BufWriter::new(&file))?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(report)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Imports a bundle file. The whole file is read and its checksum checked before
    /// anything is applied, so a truncated, corrupt or foreign file changes nothing. Then it
    /// is applied in bounded batches, each one SQLite transaction; the coverage it brings is
    /// recorded with the last one. Interrupted at any point, the database is consistent and
    /// importing the same file again completes it. Importing twice changes nothing.
    pub fn import_bundle_file(&mut self, path: &Path) -> Result<ApplyReport, Error> {
        bundle::verify(BufReader::new(File::open(path)?))?;
        let mut reader = BundleReader::new(BufReader::new(File::open(path)?))?;
        let mut total = ApplyReport::default();
        let mut batch = Batch::default();
        let mut covers = Coverage::default();
        while let Some(record) = reader.next_record()? {
            match record {
                Record::Change(c) => {
                    let c = from_wire(c);
                    let boundary = batch.changes.last().is_some_and(|last: &Change| {
                        (last.site_id, last.db_version) != (c.site_id, c.db_version)
                    });
                    if boundary && batch.changes.len() >= IMPORT_BATCH {
                        add(&mut total, self.apply(&std::mem::take(&mut batch))?);
                    }
                    batch.changes.push(c);
                }
                Record::Cover { site, start, end } => covers.insert(SiteId(site), start, end),
            }
        }
        batch.covers = covers;
        add(&mut total, self.apply(&batch)?);
        Ok(total)
    }
}

fn add(total: &mut ApplyReport, r: ApplyReport) {
    total.transactions += r.transactions;
    total.applied += r.applied;
    total.unchanged += r.unchanged;
    total.already_seen += r.already_seen;
    total.pending += r.pending;
}
