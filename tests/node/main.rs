//! Black-box tests of the node: the built binary, a real SQLite file, real HTTP on loopback.

mod harness;

mod aliases;
mod app_claims;
mod app_logs;
mod bad_input;
mod bundles;
mod database;
mod gc;
mod hostile_bundles;
mod http_edge;
mod peer_claims;
mod peer_links;
mod peers;
mod priorities;
mod secrets;
mod serverless;
mod serving;
mod storage_limits;
mod sync_port;
mod versions;
