//! The probe's command line (`serve ...` / `connect ...`), parsed by hand so that any binary can embed it
//! behind its own argument parser, and rendered back for callers that spawn the probe.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::connect::{ConnectOpts, DEFAULT_TIMEOUT, connect, connect_many, held, keep_open, udp_stream};
use super::serve::{DEFAULT_IDLE_TIMEOUT, DEFAULT_LIFETIME, ServeOpts, serve};
use super::{Endpoint, Observation, ProbeError};

/// Upper bounds that keep a mistyped argument from running for days.
// Bounded, but above what a stream makes in the long disruption suite
// (a pod's stream to a ClusterIP: ~9,000 a second for many minutes).
const MAX_COUNT: u32 = 100_000_000;
const MAX_SECONDS: f64 = 86_400.0;

const USAGE: &str = "\
usage:
  serve --name NAME [--echo-lines] [--ready-file PATH] [--lifetime SECS] [--idle-timeout SECS] ENDPOINT...
  connect ENDPOINT [--bind IP] [--source-port PORT] [--timeout SECS] [--connected] [--message TEXT]
          [--pad BYTES] [--ipv6-dstopts] [--reverse-fragments]
          [--count N | --keep-open SECS | --udp-stream SECS | --held SECS]
ENDPOINT is IP:PORT/tcp or IP:PORT/udp ([IPv6]:PORT/udp for IPv6).
connect prints one JSON observation per attempt and exits 0 whenever it observed something.";

/// How many attempts a `connect` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectMode {
    /// One attempt.
    Once,
    /// N sequential attempts, each with a new socket (`--count N`).
    Count(u32),
    /// One TCP connection, one exchange every 100 ms for this long (`--keep-open SECS`).
    KeepOpen(Duration),
    /// One connected UDP socket (replaced when it fails), one datagram every 100 ms for this long
    /// (`--udp-stream SECS`).
    UdpStream(Duration),
    /// One TCP connection, one exchange at once and one more for every line read on stdin, until stdin
    /// closes or this long has passed (`--held SECS`): a connection held open across changes.
    Held(Duration),
}

/// Runs `serve ...` or `connect ...` (the words after the program name or after `ferry probe`) and
/// returns the process exit code: 0 served / observed, 1 failed, 2 bad arguments.
pub fn main_from_args(args: &[String]) -> i32 {
    let result = match args.first().map(String::as_str) {
        Some("serve") => parse_serve(&args[1..]).and_then(|opts| serve(&opts)),
        Some("connect") => parse_connect(&args[1..]).and_then(|(opts, mode)| run_connect(&opts, mode)),
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            return 0;
        }
        _ => Err(ProbeError::Usage("expected `serve` or `connect`".into())),
    };
    match result {
        Ok(()) => 0,
        Err(ProbeError::Usage(msg)) => {
            eprintln!("ferry probe: {msg}\n{USAGE}");
            2
        }
        Err(e) => {
            eprintln!("ferry probe: {e}");
            1
        }
    }
}

fn run_connect(opts: &ConnectOpts, mode: ConnectMode) -> Result<(), ProbeError> {
    let print = |observation: &Observation| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", observation.to_json_line())?;
        out.flush()
    };
    match mode {
        ConnectMode::Once => print(&connect(opts)?).map_err(ProbeError::Output),
        ConnectMode::Count(n) => connect_many(opts, n, print),
        ConnectMode::KeepOpen(hold) => keep_open(opts, hold, print),
        ConnectMode::UdpStream(hold) => udp_stream(opts, hold, print),
        ConnectMode::Held(lifetime) => held(opts, lifetime, std::io::BufReader::new(std::io::stdin()), print),
    }
}

/// Walks `--flag value` pairs and positional words.
struct Words<'a> {
    rest: std::slice::Iter<'a, String>,
}

impl<'a> Words<'a> {
    fn value(&mut self, flag: &str) -> Result<&'a str, ProbeError> {
        self.rest.next().map(String::as_str).ok_or_else(|| ProbeError::Usage(format!("{flag} needs a value")))
    }
}

fn parse_seconds(flag: &str, text: &str) -> Result<Duration, ProbeError> {
    let bad = || ProbeError::Usage(format!("{flag} takes seconds between 0 and {MAX_SECONDS}, not {text:?}"));
    let secs: f64 = text.parse().map_err(|_| bad())?;
    if !(0.0..=MAX_SECONDS).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_serve(args: &[String]) -> Result<ServeOpts, ProbeError> {
    let mut opts = ServeOpts::new("", Vec::new());
    let mut words = Words { rest: args.iter() };
    while let Some(word) = words.rest.next() {
        match word.as_str() {
            "--name" => opts.name = words.value(word)?.to_owned(),
            "--echo-lines" => opts.echo_lines = true,
            "--ready-file" => opts.ready_file = Some(PathBuf::from(words.value(word)?)),
            "--lifetime" => opts.lifetime = parse_seconds(word, words.value(word)?)?,
            "--idle-timeout" => opts.idle_timeout = parse_seconds(word, words.value(word)?)?,
            "--listen" => opts.listen.push(words.value(word)?.parse()?),
            flag if flag.starts_with("--") => return Err(ProbeError::Usage(format!("unknown serve flag {flag}"))),
            endpoint => opts.listen.push(endpoint.parse()?),
        }
    }
    if opts.name.is_empty() {
        return Err(ProbeError::Usage("serve needs --name".into()));
    }
    if opts.listen.is_empty() {
        return Err(ProbeError::Usage("serve needs at least one ENDPOINT".into()));
    }
    Ok(opts)
}

fn parse_connect(args: &[String]) -> Result<(ConnectOpts, ConnectMode), ProbeError> {
    let mut target: Option<Endpoint> = None;
    let (mut bind, mut timeout, mut connected, mut message) = (None, DEFAULT_TIMEOUT, false, None);
    let (mut pad, mut dstopts, mut reverse) = (0, false, false);
    let mut source_port = None;
    let mut mode = ConnectMode::Once;
    let mut words = Words { rest: args.iter() };
    while let Some(word) = words.rest.next() {
        match word.as_str() {
            "--bind" => {
                let text = words.value(word)?;
                let ip: IpAddr =
                    text.parse().map_err(|_| ProbeError::Usage(format!("--bind takes an IP address, not {text:?}")))?;
                bind = Some(ip);
            }
            "--source-port" => {
                let text = words.value(word)?;
                let port = text.parse().ok().filter(|p| *p != 0);
                source_port =
                    Some(port.ok_or_else(|| ProbeError::Usage(format!("--source-port takes 1-65535, not {text:?}")))?);
            }
            "--timeout" => timeout = parse_seconds(word, words.value(word)?)?,
            "--connected" => connected = true,
            "--message" => message = Some(words.value(word)?.to_owned()),
            "--ipv6-dstopts" => dstopts = true,
            "--reverse-fragments" => reverse = true,
            "--pad" => {
                let text = words.value(word)?;
                pad = text.parse().map_err(|_| ProbeError::Usage(format!("--pad takes a byte count, not {text:?}")))?;
            }
            "--count" => {
                let text = words.value(word)?;
                let n = text.parse().ok().filter(|n| (1..=MAX_COUNT).contains(n));
                let n = n.ok_or_else(|| ProbeError::Usage(format!("--count takes 1 to {MAX_COUNT}, not {text:?}")))?;
                mode = ConnectMode::Count(n);
            }
            "--keep-open" => mode = ConnectMode::KeepOpen(parse_seconds(word, words.value(word)?)?),
            "--udp-stream" => mode = ConnectMode::UdpStream(parse_seconds(word, words.value(word)?)?),
            "--held" => mode = ConnectMode::Held(parse_seconds(word, words.value(word)?)?),
            flag if flag.starts_with("--") => return Err(ProbeError::Usage(format!("unknown connect flag {flag}"))),
            endpoint if target.is_none() => target = Some(endpoint.parse()?),
            extra => return Err(ProbeError::Usage(format!("connect takes one ENDPOINT; {extra:?} is a second"))),
        }
    }
    let target = target.ok_or_else(|| ProbeError::Usage("connect needs an ENDPOINT".into()))?;
    let mut opts = ConnectOpts::new(target);
    opts.bind = bind;
    opts.source_port = source_port;
    opts.timeout = timeout;
    opts.connected_udp = connected;
    opts.pad = pad;
    opts.ipv6_dstopts = dstopts;
    opts.reverse_fragments = reverse;
    if let Some(message) = message {
        opts.message = message;
    }
    Ok((opts, mode))
}

impl ServeOpts {
    /// The `serve ...` arguments that reproduce these options.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["serve".to_owned(), "--name".to_owned(), self.name.clone()];
        if self.echo_lines {
            args.push("--echo-lines".into());
        }
        if let Some(path) = &self.ready_file {
            args.extend(["--ready-file".into(), path.to_string_lossy().into_owned()]);
        }
        if self.lifetime != DEFAULT_LIFETIME {
            args.extend(["--lifetime".into(), self.lifetime.as_secs_f64().to_string()]);
        }
        if self.idle_timeout != DEFAULT_IDLE_TIMEOUT {
            args.extend(["--idle-timeout".into(), self.idle_timeout.as_secs_f64().to_string()]);
        }
        args.extend(self.listen.iter().map(Endpoint::to_string));
        args
    }
}

impl ConnectOpts {
    /// The `connect ...` arguments that reproduce these options and `mode`.
    pub fn to_args(&self, mode: ConnectMode) -> Vec<String> {
        let mut args = vec!["connect".to_owned(), self.target.to_string()];
        if let Some(ip) = self.bind {
            args.extend(["--bind".into(), ip.to_string()]);
        }
        if let Some(port) = self.source_port {
            args.extend(["--source-port".into(), port.to_string()]);
        }
        if self.timeout != DEFAULT_TIMEOUT {
            args.extend(["--timeout".into(), self.timeout.as_secs_f64().to_string()]);
        }
        if self.connected_udp {
            args.push("--connected".into());
        }
        args.extend(["--message".into(), self.message.clone()]);
        if self.pad > 0 {
            args.extend(["--pad".into(), self.pad.to_string()]);
        }
        if self.ipv6_dstopts {
            args.push("--ipv6-dstopts".into());
        }
        if self.reverse_fragments {
            args.push("--reverse-fragments".into());
        }
        match mode {
            ConnectMode::Once => {}
            ConnectMode::Count(n) => args.extend(["--count".into(), n.to_string()]),
            ConnectMode::KeepOpen(hold) => args.extend(["--keep-open".into(), hold.as_secs_f64().to_string()]),
            ConnectMode::UdpStream(hold) => args.extend(["--udp-stream".into(), hold.as_secs_f64().to_string()]),
            ConnectMode::Held(lifetime) => args.extend(["--held".into(), lifetime.as_secs_f64().to_string()]),
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn serve_args_round_trip() {
        let mut opts = ServeOpts::new("backend-1", vec!["198.18.0.2:80/tcp".parse().unwrap()]);
        opts.listen.push("[fd00::2]:53/udp".parse().unwrap());
        opts.echo_lines = true;
        opts.ready_file = Some("/tmp/r".into());
        opts.lifetime = Duration::from_millis(1500);
        opts.idle_timeout = Duration::from_secs(600);
        let args = opts.to_args();
        assert_eq!(args[0], "serve");
        assert_eq!(parse_serve(&args[1..]).unwrap(), opts);
    }

    #[test]
    fn connect_args_round_trip() {
        let mut opts = ConnectOpts::new("[fd00::2]:53/udp".parse().unwrap());
        opts.bind = Some("fd00::1".parse().unwrap());
        opts.timeout = Duration::from_millis(250);
        opts.connected_udp = true;
        opts.pad = 3988;
        opts.ipv6_dstopts = true;
        opts.reverse_fragments = true;
        for mode in [
            ConnectMode::Once,
            ConnectMode::Count(7),
            ConnectMode::KeepOpen(Duration::from_secs(2)),
            ConnectMode::UdpStream(Duration::from_secs(3)),
            ConnectMode::Held(Duration::from_secs(60)),
        ] {
            let args = opts.to_args(mode);
            assert_eq!(parse_connect(&args[1..]).unwrap(), (opts.clone(), mode));
        }
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        for line in [
            "serve 198.18.0.2:80/tcp",
            "serve --name x",
            "serve --name x --bogus 198.18.0.2:80/tcp",
            "connect",
            "connect 198.18.0.2:80/tcp 198.18.0.3:80/tcp",
            "connect 198.18.0.2:80/tcp --count 0",
            "connect 198.18.0.2:80/tcp --timeout -1",
            "connect 198.18.0.2:80/tcp --bind nope",
        ] {
            let args = words(line);
            let parsed = match args[0].as_str() {
                "serve" => parse_serve(&args[1..]).map(drop),
                _ => parse_connect(&args[1..]).map(drop),
            };
            assert!(matches!(parsed, Err(ProbeError::Usage(_))), "{line}");
        }
        assert_eq!(main_from_args(&words("frobnicate")), 2);
    }
}
