//! Node configuration: CLI flags (this run only) > database > defaults.
//!
//! Port and domain describe how *this* node listens, so they live in the node-local
//! `node_config` table. Cluster-wide settings (deploy limits) live in the replicated
//! `settings` table.

use std::fmt;

use anyhow::{bail, Result};
use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

pub const DEFAULT_PORT: u16 = 4698;
pub const DEFAULT_DOMAIN: &str = "localhost";
/// Largest single file a deploy accepts unless the `deploy.max_file_bytes` setting says otherwise.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Flag,
    Database,
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Flag => "flag",
            Source::Database => "database",
            Source::Default => "default",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Setting<T> {
    pub value: T,
    pub source: Source,
}

/// Overrides given on the command line for one run.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub port: Option<u16>,
    pub domain: Option<Domain>,
    pub sync_port: Option<u16>,
}

/// A host name the node answers for (`example.com`, `localhost`, `192.0.2.7`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Domain(String);

impl Domain {
    pub fn parse(input: &str) -> Result<Domain> {
        let d = input.trim().trim_end_matches('.').to_ascii_lowercase();
        if d.contains("://") || d.contains('/') || d.contains(':') {
            bail!("domain {input:?} must be a bare host name such as example.com (no scheme, port or path)");
        }
        let labels_ok = !d.is_empty()
            && d.len() <= 253
            && d.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !labels_ok {
            bail!("domain {input:?} is not a valid host name (letters, digits, '-' and '.')");
        }
        Ok(Domain(d))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeConfig {
    pub domain: Setting<Domain>,
    pub port: Setting<u16>,
    /// UDP port of the peer (QUIC) listener; by default the HTTP port's number.
    pub sync_port: Setting<u16>,
}

impl NodeConfig {
    /// Resolves each setting from the flags, then the database, then the defaults.
    pub fn load(conn: &Connection, overrides: &Overrides) -> Result<NodeConfig> {
        let domain = match &overrides.domain {
            Some(d) => Setting {
                value: d.clone(),
                source: Source::Flag,
            },
            None => match get_local(conn, "domain")? {
                Some(v) => Setting {
                    value: Domain::parse(&v)?,
                    source: Source::Database,
                },
                None => Setting {
                    value: Domain(DEFAULT_DOMAIN.into()),
                    source: Source::Default,
                },
            },
        };
        let port = match overrides.port {
            Some(p) => Setting { value: p, source: Source::Flag },
            None => match get_local(conn, "port")? {
                Some(v) => Setting {
                    value: v.parse().map_err(|_| anyhow::anyhow!("stored port {v:?} is not a port number: fix it with `fazt server set-config --port`"))?,
                    source: Source::Database,
                },
                None => Setting { value: DEFAULT_PORT, source: Source::Default },
            },
        };
        let sync_port = match overrides.sync_port {
            Some(p) => Setting { value: p, source: Source::Flag },
            None => match get_local(conn, "sync_port")? {
                Some(v) => Setting {
                    value: v.parse().map_err(|_| anyhow::anyhow!("stored sync port {v:?} is not a port number: fix it with `fazt server set-config --sync-port`"))?,
                    source: Source::Database,
                },
                None => Setting { value: port.value, source: Source::Default },
            },
        };
        Ok(NodeConfig {
            domain,
            port,
            sync_port,
        })
    }
}

pub fn get_local(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT value FROM node_config WHERE key = ?1",
            [key],
            |row| row.get(0),
        )
        .optional()?)
}

pub fn set_local(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO node_config (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// A cluster-wide setting with its source (database or default).
pub fn max_file_bytes(conn: &Connection) -> Result<Setting<u64>> {
    let stored: Option<String> = conn
        .query_row(
            "SELECT value FROM settings WHERE key = 'deploy.max_file_bytes'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    Ok(match stored.and_then(|v| v.parse().ok()) {
        Some(value) => Setting {
            value,
            source: Source::Database,
        },
        None => Setting {
            value: DEFAULT_MAX_FILE_BYTES,
            source: Source::Default,
        },
    })
}

pub fn set_max_file_bytes(db: &mut crate::db::Db, bytes: u64) -> Result<()> {
    db.write(|tx| {
        tx.execute(
            "INSERT INTO settings (key, value) VALUES ('deploy.max_file_bytes', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [bytes.to_string()],
        )?;
        Ok(())
    })
}

/// Parses sizes such as `512`, `10K`, `64M`, `1G` (binary multiples).
pub fn parse_size(input: &str) -> Result<u64> {
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| anyhow::anyhow!("size {input:?} must look like 512, 10K, 64M or 1G"))?;
    let mult: u64 = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => bail!("size {input:?} must look like 512, 10K, 64M or 1G"),
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| anyhow::anyhow!("size {input:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_normalised_or_refused() {
        assert_eq!(
            Domain::parse("Example.COM.").unwrap().as_str(),
            "example.com"
        );
        assert!(Domain::parse("https://example.com").is_err());
        assert!(Domain::parse("example.com:80").is_err());
        assert!(Domain::parse("bad_domain").is_err());
        assert!(Domain::parse("").is_err());
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("10K").unwrap(), 10 * 1024);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("5T").is_err());
    }
}
