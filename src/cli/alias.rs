//! `fazt alias ...`

use std::path::Path;

use anyhow::Result;
use clap::Subcommand;

use super::output;
use crate::hosting::names::{AppName, Subdomain};
use crate::hosting::store;

#[derive(Subcommand)]
pub enum AliasCmd {
    /// Point SUBDOMAIN at APP (creates or moves the alias)
    Link { subdomain: String, app: String },
    /// Remove an alias
    Unlink { subdomain: String },
    /// Exchange the apps behind two aliases atomically
    Swap { a: String, b: String },
    /// List aliases
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: AliasCmd, db: &Path) -> Result<()> {
    match cmd {
        AliasCmd::Link { subdomain, app } => {
            let sub = Subdomain::parse(&subdomain)?;
            let app = AppName::parse(&app)?;
            let mut database = crate::db::open_existing(db)?;
            match store::link(&mut database, &sub, &app)? {
                Some(prev) if prev != app.as_str() => {
                    println!("{sub} now points at {app} (was {prev})")
                }
                _ => println!("{sub} points at {app}"),
            }
            println!("{}", super::app::url(database.conn(), sub.as_str())?);
            Ok(())
        }
        AliasCmd::Unlink { subdomain } => {
            let sub = Subdomain::parse(&subdomain)?;
            let mut database = crate::db::open_existing(db)?;
            store::unlink(&mut database, &sub)?;
            println!("removed alias {sub}");
            Ok(())
        }
        AliasCmd::Swap { a, b } => {
            let (a, b) = (Subdomain::parse(&a)?, Subdomain::parse(&b)?);
            let mut database = crate::db::open_existing(db)?;
            store::swap(&mut database, &a, &b)?;
            println!("swapped {a} and {b}");
            Ok(())
        }
        AliasCmd::List { json } => {
            let database = crate::db::open_existing(db)?;
            let aliases = store::list_aliases(database.conn())?;
            if json {
                return output::json(&aliases);
            }
            let rows = aliases
                .iter()
                .map(|a| {
                    vec![
                        a.subdomain.clone(),
                        if a.app.is_empty() {
                            a.app_id.clone()
                        } else {
                            a.app.clone()
                        },
                    ]
                })
                .collect::<Vec<_>>();
            output::table(&["SUBDOMAIN", "APP"], &rows);
            Ok(())
        }
    }
}
