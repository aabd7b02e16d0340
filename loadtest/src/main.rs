//! `rankd-load`: the open-loop load generator. Not built yet (the hot-reload and load-generator
//! issue); the Rust client it will drive is `rankd_serving::client`.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("rankd-load: the load generator is not implemented yet.");
    ExitCode::from(2)
}
