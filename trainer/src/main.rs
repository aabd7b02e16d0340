//! `rankd-train`: the offline trainer (data-parallel, parameter server). Not built yet: the model
//! file, feature-ops and engine it builds on are in place; training itself is the trainer issue.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "rankd-train: training is not implemented yet. Build model files with `rankd-tool import` \
         (PyTorch weights) or `rankd-tool synth`."
    );
    ExitCode::from(2)
}
