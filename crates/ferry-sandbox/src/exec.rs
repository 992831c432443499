//! Running external commands with a deadline, so that a stuck tool fails a test instead of hanging it.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::SandboxError;

/// How long to wait for a command's pipes after it exited: a grandchild that inherited them may keep them
/// open forever, and its output is not worth hanging for.
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// The command line as a shell user would type it, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut line = quote(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(&arg.to_string_lossy()));
    }
    line
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,[]".contains(&b));
    if plain { word.to_owned() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// Polls `child` until it exits or `timeout` passes; `None` means it is still running.
pub(crate) fn wait_bounded(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion with captured output; `Ok(None)` means it timed out and was killed.
pub(crate) fn output_with_timeout(
    cmd: &mut Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
) -> std::io::Result<Option<Output>> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A separate writer, so a child that never reads cannot block us past the deadline.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let Some(status) = wait_bounded(&mut child, timeout)? else {
        let _ = child.kill();
        let _ = child.wait();
        return Ok(None);
    };
    Ok(Some(Output {
        status,
        stdout: stdout.recv_timeout(PIPE_GRACE).unwrap_or_default(),
        stderr: stderr.recv_timeout(PIPE_GRACE).unwrap_or_default(),
    }))
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

/// Runs a setup command that must succeed; failure becomes a [`SandboxError`] quoting the command line.
pub(crate) fn run_checked(
    what: String,
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    hint: &'static str,
) -> Result<Output, SandboxError> {
    let cmdline = describe(&cmd);
    match output_with_timeout(&mut cmd, stdin, timeout) {
        Err(source) => Err(SandboxError::CommandSpawn { what, cmdline, source }),
        Ok(None) => Err(SandboxError::CommandTimeout { what, cmdline, timeout }),
        Ok(Some(out)) if out.status.success() => Ok(out),
        Ok(Some(out)) => Err(SandboxError::CommandFailed {
            what,
            cmdline,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            hint,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_only_what_needs_it() {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", "ferry-t-1-0-a", "addr", "add", "fd00::1/64", "dev", "eth 0", ""]);
        assert_eq!(describe(&cmd), "ip -n ferry-t-1-0-a addr add fd00::1/64 dev 'eth 0' ''");
    }

    #[test]
    fn slow_commands_are_killed() {
        let mut cmd = Command::new("sleep");
        cmd.arg("5");
        let out = output_with_timeout(&mut cmd, None, Duration::from_millis(50)).unwrap();
        assert!(out.is_none());
    }

    #[test]
    fn stdin_is_fed_and_output_captured() {
        let mut cmd = Command::new("cat");
        let out = output_with_timeout(&mut cmd, Some(b"hello\n".to_vec()), Duration::from_secs(10)).unwrap().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"hello\n");
    }
}
