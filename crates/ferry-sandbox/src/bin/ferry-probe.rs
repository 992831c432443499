//! `ferry-probe serve|connect ...`: the traffic probe as a standalone binary, for this crate's tests and
//! for anyone who needs the probe without the `ferry` binary.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(ferry_sandbox::probe::main_from_args(&args));
}
