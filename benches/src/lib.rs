//! Shared inputs of the criterion benchmarks under `benches/benches/`.
//!
//! Run them with `cargo bench -p rankd-benches`; CI only compiles them.
#![forbid(unsafe_code)]

pub use rankd_formats::synth::{feed, Zipf};
