//! Static hosting: names, deploys into immutable versions, and serving them over HTTP.

pub mod content;
pub mod deploy;
pub mod gc;
pub mod listener;
pub mod names;
pub mod serve;
pub mod site;
pub mod store;
