//! Running `nft` / `iptables-restore` with a script on stdin, timed from
//! spawn to exit, killed at a deadline.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How a timed run ended.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Exited successfully after this long.
    Done(Duration),
    /// Still running at the deadline: killed.
    TimedOut,
}

/// Runs `cmd` with `input` on stdin; an error if it exits non-zero (with its stderr).
/// The wall time covers spawning, writing the input and the process's exit.
pub fn run_with_input(mut cmd: Command, input: &str, timeout: Duration) -> anyhow::Result<Outcome> {
    let what = format!("{cmd:?}");
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {what}: {e}"))?;
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| -> anyhow::Result<Outcome> {
        // A broken pipe means the process exited early; its status and stderr say why.
        let writer = scope.spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let reader = scope.spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        scope.spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(timeout) {
            Ok(status) => status?,
            Err(_) => {
                // SAFETY: kill(2) on our own child's pid, which is not reaped until the wait above returns.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                let _ = rx.recv();
                let _ = writer.join();
                let _ = reader.join();
                return Ok(Outcome::TimedOut);
            }
        };
        let elapsed = t0.elapsed();
        let _ = writer.join();
        let err = reader.join().unwrap_or_default();
        anyhow::ensure!(status.success(), "{what} failed ({status}): {}", err.trim());
        Ok(Outcome::Done(elapsed))
    })
}
