//! Black-box tests of the node: the built binary, a real SQLite file, real HTTP on loopback.

mod harness;

mod aliases;
mod bad_input;
mod bundles;
mod database;
mod hostile_bundles;
mod peers;
mod serverless;
mod serving;
mod versions;
