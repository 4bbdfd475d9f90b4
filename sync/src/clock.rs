//! The numbers a change carries, each its own type so that one cannot stand in for another:
//! a [`DbVersion`] (an origin's Lamport clock, numbering its transactions), a [`Seq`] (a
//! write's position in its origin transaction), a [`ColVersion`] (how often a column was
//! written in the row's incarnation) and a [`CausalLength`] (how often the row was created
//! or deleted).
//!
//! Each is a plain `i64` underneath, stored in SQLite and carried on the wire as one: the
//! `ToSql`/`FromSql` impls bind them as integers and serde writes them as numbers, so the
//! SQL, the files and the JSON reports do not change.
//! Numbers from outside (the wire, a bundle) are checked against
//! [`fazt_proto::wire::MAX_VERSION`] when a merge takes them; inside, they are trusted.

use std::fmt;

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

macro_rules! clock_number {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                self.0.to_sql()
            }
        }

        impl FromSql for $name {
            fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
                i64::column_result(v).map($name)
            }
        }
    };
}

clock_number! {
    /// An origin's db_version: the Lamport clock that numbers its transactions (1 is the
    /// first; 0 means none yet).
    DbVersion
}

clock_number! {
    /// A write's position in its origin transaction (from 0).
    Seq
}

clock_number! {
    /// How many times a column was written in the current incarnation of its row (from 1).
    ColVersion
}

clock_number! {
    /// A row's causal length: how many times it was created or deleted. Odd while the row
    /// exists, even once deleted; a larger one starts a new incarnation.
    CausalLength
}

impl DbVersion {
    /// The version after this one (saturating: versions are bounded far below `i64::MAX`).
    pub fn next(self) -> DbVersion {
        DbVersion(self.0.saturating_add(1))
    }

    /// The version before this one (saturating).
    pub fn prev(self) -> DbVersion {
        DbVersion(self.0.saturating_sub(1))
    }
}

impl CausalLength {
    /// The causal length of a row that was created once and never deleted.
    pub const FIRST: CausalLength = CausalLength(1);

    /// Whether the row exists in the incarnation this causal length names (it is odd).
    pub fn is_live(self) -> bool {
        self.0.rem_euclid(2) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_causal_lengths_are_live_and_even_ones_deleted() {
        assert!(CausalLength(1).is_live() && CausalLength(3).is_live());
        assert!(!CausalLength(0).is_live() && !CausalLength(2).is_live());
        assert!(!CausalLength(-2).is_live() && CausalLength(-1).is_live());
    }

    #[test]
    fn clock_numbers_bind_as_plain_integers() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let (v, seq): (i64, Seq) = conn
            .query_row(
                "SELECT ?1, ?2",
                rusqlite::params![DbVersion(7), Seq(3)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((v, seq), (7, Seq(3)));
    }
}
