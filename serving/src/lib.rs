//! rankd's serving side: the daemon ([`server`], [`registry`], [`reload`], [`hdfs_source`],
//! [`admin`], [`kserve`], [`updates`]). The wire protocol and the Rust client live in `rankd-client`
//! (re-exported here as [`client`], [`protocol`] and [`gen`]); the engines in `rankd-engine`
//! (re-exported as [`engine`]).

pub mod admin;
/// The Rust client, its wire protocol and generated code, re-exported.
pub use rankd_client as client;
pub use rankd_client::{gen, protocol};
pub mod config;
/// The engines, re-exported: the daemon calls them through [`engine::InferenceBackend`].
pub use rankd_engine as engine;
pub mod fbrequest;
pub mod hdfs_source;
pub mod kserve;
pub mod metrics;
pub mod registry;
pub mod reload;
pub mod server;
pub mod updates;
