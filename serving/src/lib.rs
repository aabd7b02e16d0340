//! rankd's serving side: the inference engines ([`engine`]) that the daemon and the offline
//! scorer share.

pub mod engine;
