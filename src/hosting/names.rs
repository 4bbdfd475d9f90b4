//! Names users type: app names and subdomains, and the ids derived from them.

use std::fmt;

use anyhow::{bail, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Subdomains the node keeps for itself.
pub const RESERVED: &[&str] = &["admin", "api", "localhost"];

fn check_label(kind: &str, s: &str) -> Result<()> {
    let valid = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if !valid {
        bail!("invalid {kind} {s:?}: use 1-63 characters from a-z, 0-9 and '-', not starting or ending with '-'");
    }
    if RESERVED.contains(&s) {
        bail!("{kind} {s:?} is reserved by fazt: choose another");
    }
    Ok(())
}

/// An app's name, as given to `--name`, in manifest.json or by the directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct AppName(String);

impl AppName {
    pub fn parse(s: &str) -> Result<AppName> {
        check_label("app name", s)?;
        Ok(AppName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The app's stable id. Derived from the name at first deploy, so two nodes that deploy
    /// the same name while apart end up with one app once they sync.
    pub fn derive_id(&self) -> AppId {
        let digest = Sha256::digest(format!("fazt-app:{}", self.0).as_bytes());
        AppId(format!("app_{}", &hex::encode(digest)[..16]))
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The label before the node's domain that selects an alias.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Subdomain(String);

impl Subdomain {
    pub fn parse(s: &str) -> Result<Subdomain> {
        check_label("subdomain", s)?;
        Ok(Subdomain(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&AppName> for Subdomain {
    fn from(name: &AppName) -> Self {
        Subdomain(name.0.clone())
    }
}

impl fmt::Display for Subdomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Stable app identity: files and (later) storage are keyed by it, never by subdomain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct AppId(pub String);

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An immutable deploy of an app.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct VersionId(pub String);

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of a file's bytes, lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ContentHash(pub String);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(hex::encode(Sha256::digest(bytes)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_follow_subdomain_rules() {
        for ok in ["blog", "a", "my-app-2", "404", "root", &"x".repeat(63)] {
            AppName::parse(ok).unwrap();
        }
        for bad in [
            "",
            "Blog",
            "-a",
            "a-",
            "a_b",
            "a.b",
            "admin",
            "api",
            &"x".repeat(64),
            "caf\u{e9}",
        ] {
            assert!(AppName::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn app_ids_are_stable_and_distinct() {
        let a = AppName::parse("blog").unwrap();
        assert_eq!(a.derive_id(), AppName::parse("blog").unwrap().derive_id());
        assert_ne!(a.derive_id(), AppName::parse("blog2").unwrap().derive_id());
        assert!(a.derive_id().0.starts_with("app_"));
    }
}
