//! `ferry probe` (hidden): the sandbox's traffic probe, shipped inside the
//! ferry binary so demos and conformance runs need nothing else.

use std::process::ExitCode;

pub fn run(args: Vec<String>) -> anyhow::Result<ExitCode> {
    let code = ferry_sandbox::probe::main_from_args(&args);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
