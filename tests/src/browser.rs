//! Test equipment that drives Debian's chromium (`/usr/bin/chromium`)
//! through the Node scripts in `tests/browser/` (playwright-core): spawns a
//! script, sends it one command per line on stdin and reads its one-line
//! answers on stdout, each with a deadline.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Whether `COMFY_MULTI_SKIP_BROWSER` is set; says so on stderr if it is.
pub fn skip() -> bool {
    let skip = std::env::var_os("COMFY_MULTI_SKIP_BROWSER").is_some();
    if skip {
        eprintln!("COMFY_MULTI_SKIP_BROWSER is set: skipping the headless Chromium test");
    }
    skip
}

/// Where test artifacts go: `COMFY_MULTI_ARTIFACTS`, else
/// `<target>/test-artifacts`. `target_tmpdir` is the test's
/// `env!("CARGO_TARGET_TMPDIR")` (`<target>/tmp`).
pub fn artifacts_dir(target_tmpdir: &str) -> PathBuf {
    match std::env::var_os("COMFY_MULTI_ARTIFACTS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(target_tmpdir).parent().expect("<target>/tmp has a parent").join("test-artifacts"),
    }
}

/// `node tests/browser/<script> <args>...` in its own process group, killed
/// with its Chromium when dropped.
pub struct Browser {
    child: tokio::process::Child,
    pgid: i32,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Browser {
    /// Spawns `script` (a file in `tests/browser/`) with `args`.
    pub fn spawn<I, S>(script: &str, args: I) -> Browser
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser");
        for (path, fix) in [
            (PathBuf::from("/usr/bin/chromium"), "Debian's chromium"),
            (dir.join("node_modules/playwright-core/package.json"), "tests/browser/node_modules (npm ci)"),
        ] {
            assert!(path.exists(), "{} is missing: run scripts/install-deps.sh, which installs {fix}", path.display());
        }
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(dir.join(script))
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("node (Node.js) must be installed: run scripts/install-deps.sh");
        let pgid = child.id().unwrap() as i32;
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Browser { child, pgid, stdin, lines }
    }

    /// The script's next line, which must start with `prefix` (so an
    /// `ERROR ...` fails), within `deadline`; returns the whole line.
    pub async fn expect(&mut self, prefix: &str, deadline: Duration) -> String {
        let secs = deadline.as_secs();
        let line = tokio::time::timeout(deadline, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser script said nothing for {secs} s (waiting for {prefix})"))
            .unwrap()
            .unwrap_or_else(|| panic!("the browser script ended before {prefix}"));
        assert!(line.starts_with(prefix), "the browser script: {line}");
        line
    }

    /// Sends one command line.
    pub async fn send(&mut self, command: &str) {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pgid), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.start_kill();
    }
}
