//! Shared inputs of the criterion benchmarks under `benches/benches/`.
//!
//! Run them with `cargo bench -p rankd-benches`; CI only compiles them.
#![forbid(unsafe_code)]

/// Zipf-distributed ranks in `0..n` with exponent `s`, drawn by inverse CDF over a table: the
/// shape of real id traffic (a few hot items, a long tail).
#[derive(Debug)]
pub struct Zipf {
    cdf: Vec<f64>,
    state: u64,
}

impl Zipf {
    /// A generator over `n` ranks.
    pub fn new(n: usize, s: f64, seed: u64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf {
            cdf,
            state: seed | 1,
        }
    }

    fn unit(&mut self) -> f64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next rank.
    pub fn next_rank(&mut self) -> usize {
        let u = self.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}
