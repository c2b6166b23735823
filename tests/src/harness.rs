//! Process harness for the end-to-end tests.
//!
//! # Why this exists
//!
//! comfy-multi's promises (jobs survive a Redis restart, ComfyUI is found
//! through Consul health, the gateway/dispatcher/gpu-task binaries cooperate)
//! are only worth testing against the real things. Every end-to-end test
//! therefore starts real `redis-server` and real `consul agent -dev` (1.8.7,
//! installed by `scripts/install-deps.sh`) and the project's own binaries as
//! child processes. This module does that once, correctly, for every test:
//!
//! - every server listens on a **free loopback port** ([`free_port`]); no
//!   fixed ports, so tests run in parallel and beside a developer's own stack;
//! - every child runs in **its own process group** and is SIGKILLed with its
//!   whole group when its guard drops ([`ChildGuard`]), so a failing test
//!   leaves no stray processes;
//! - children's output goes to a **log file** whose tail is put into failure
//!   messages ([`ChildGuard::log_tail`]); when a test panics the log folder is
//!   kept and its path printed (set `COMFY_MULTI_KEEP_LOGS=1` to always keep);
//! - tests **wait on conditions with deadlines** ([`wait_until`]), never on
//!   sleeps.
//!
//! Binaries are taken from the target profile dir of the running test
//! executable ([`bin_path`]): run `cargo build --workspace --bins` first
//! (`scripts/test.sh` does).

use std::collections::HashSet;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill as nix_kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How often [`wait_until`] re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How long servers get to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Ports, waiting, paths
// ---------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1: binds port 0 and reads what the kernel chose.
///
/// The port is released before returning, so another process could take it;
/// within this test process the same port is never handed out twice.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("free_port: no new free loopback port after 1000 tries");
}

/// Polls `check` every ~25 ms until it returns `Some`, or fails after `timeout`
/// with an error naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

/// The cache folder of `scripts/install-deps.sh`:
/// `$COMFY_MULTI_CACHE`, else `$HOME/.cache/comfy-multi`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("COMFY_MULTI_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache").join("comfy-multi")
        }
    }
}

/// The target profile dir (`<target>/<profile>`) the running test executable
/// was built into. Test executables live in `<target>/<profile>/deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("test executable has a parent dir").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary (`gateway`, `dispatcher`, `gpu-task`,
/// `comfyui-standin`, `nomad-standin`) in the same target profile dir as the
/// running test executable. Panics if it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    let path = profile_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}: run `cargo build --workspace --bins` first \
             (with the same profile and CARGO_TARGET_DIR as the tests)",
            path.display()
        );
    }
    path
}

/// Path of an external tool (`consul`, `redis-server`, ...): first on `PATH`,
/// then in `cache_dir()/bin`. Panics if neither has it.
pub fn tool_path(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let cached = cache_dir().join("bin");
    for dir in on_path.iter().chain(std::iter::once(&cached)) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return candidate;
        }
    }
    panic!(
        "tool `{name}` not found on PATH nor in {}: run `scripts/install-deps.sh` \
         (or `scripts/test.sh`, which runs it)",
        cached.display()
    );
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// Anything [`spawn_logged`] accepts: a `tokio::process::Command` or a
/// `std::process::Command`, by value or by `&mut` (a `&mut` command can be
/// spawned again later, e.g. to restart a process).
pub trait SpawnCommand {
    #[doc(hidden)]
    fn with_tokio_command<R>(self, f: impl FnOnce(&mut tokio::process::Command) -> R) -> R;
}

impl SpawnCommand for tokio::process::Command {
    fn with_tokio_command<R>(mut self, f: impl FnOnce(&mut tokio::process::Command) -> R) -> R {
        f(&mut self)
    }
}

impl SpawnCommand for &mut tokio::process::Command {
    fn with_tokio_command<R>(self, f: impl FnOnce(&mut tokio::process::Command) -> R) -> R {
        f(self)
    }
}

impl SpawnCommand for std::process::Command {
    fn with_tokio_command<R>(self, f: impl FnOnce(&mut tokio::process::Command) -> R) -> R {
        f(&mut tokio::process::Command::from(self))
    }
}

impl SpawnCommand for &mut std::process::Command {
    fn with_tokio_command<R>(self, f: impl FnOnce(&mut tokio::process::Command) -> R) -> R {
        // Borrow the command's whole configuration, then give it back.
        let std_cmd = std::mem::replace(self, std::process::Command::new(""));
        let mut tokio_cmd = tokio::process::Command::from(std_cmd);
        let result = f(&mut tokio_cmd);
        *self = tokio_cmd.into_std();
        result
    }
}

/// A child process in its own process group, SIGKILLed together with its
/// whole group on [`kill`](ChildGuard::kill) or drop. Its stdout and stderr go
/// to a log file (see [`log_tail`](ChildGuard::log_tail)); stdout can also be
/// read live through [`take_stdout`](ChildGuard::take_stdout).
pub struct ChildGuard {
    child: tokio::process::Child,
    pid: u32,
    name: String,
    log_path: PathBuf,
    log_dir: tempfile::TempDir,
    stdout: Option<ChildStdoutTee>,
    stdout_taken: Arc<AtomicBool>,
    killed: bool,
}

/// How much stdout is kept for a [`ChildGuard::take_stdout`] that has not
/// been called yet; past that, stdout only goes to the log file.
const UNTAKEN_STDOUT_CAP: usize = 1 << 20;

/// Spawns `cmd` in its own process group, stdin closed, stdout and stderr
/// appended to `<tmp>/comfy-multi-<name>-*/<name>.log`. Stdout is also teed to
/// a reader that [`ChildGuard::take_stdout`] hands out (so a test can read a
/// "listening on ..." line while the log still gets everything); the
/// command's own stdout/stderr settings are replaced. Panics (with the reason)
/// if the program cannot be started. Must be called inside a tokio runtime.
pub fn spawn_logged(cmd: impl SpawnCommand, name: &str) -> ChildGuard {
    let name: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    cmd.with_tokio_command(|cmd| {
        let program = cmd.as_std().get_program().to_string_lossy().into_owned();
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("comfy-multi-{name}-"))
            .tempdir()
            .expect("create temp dir for child log");
        let log_path = log_dir.path().join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("create child log file");
        let stderr = log.try_clone().expect("clone child log file handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{program}` ({name}): {e}"));
        let pid = child.id().expect("freshly spawned child has a pid");

        // Pump stdout into the log file and, until it is dropped, the tee.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let stdout_taken = Arc::new(AtomicBool::new(false));
        let mut pipe = child.stdout.take().expect("stdout is piped");
        let taken = stdout_taken.clone();
        let mut log = log;
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut untaken_bytes = 0usize;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let _ = log.write_all(&buf[..n]);
                if let Some(sender) = &tx {
                    if !taken.load(Ordering::Acquire) {
                        untaken_bytes += n;
                    }
                    if untaken_bytes > UNTAKEN_STDOUT_CAP || sender.send(buf[..n].to_vec()).is_err() {
                        tx = None;
                    }
                }
            }
        });
        ChildGuard {
            child,
            pid,
            name,
            log_path,
            log_dir,
            stdout: Some(ChildStdoutTee { rx, chunk: Vec::new(), pos: 0 }),
            stdout_taken,
            killed: false,
        }
    })
}

/// The child's stdout as an [`AsyncRead`](tokio::io::AsyncRead), from its
/// first byte; ends when the child's stdout closes. Everything read here is
/// in the log file too.
pub struct ChildStdoutTee {
    rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl tokio::io::AsyncRead for ChildStdoutTee {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        loop {
            if self.pos < self.chunk.len() {
                let n = out.remaining().min(self.chunk.len() - self.pos);
                let start = self.pos;
                out.put_slice(&self.chunk[start..start + n]);
                self.pos += n;
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl ChildGuard {
    /// The child's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Takes the live copy of the child's stdout (from its first byte); `None`
    /// the second time. Not taken, up to 1 MiB of it is kept for a late taker.
    pub fn take_stdout(&mut self) -> Option<ChildStdoutTee> {
        self.stdout_taken.store(true, Ordering::Release);
        self.stdout.take()
    }

    /// The name given to [`spawn_logged`], as used in the log file's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file holding the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far (lossy UTF-8).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the child's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        const MAX_BYTES: u64 = 256 * 1024;
        let mut buf = Vec::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
            let _ = f.read_to_end(&mut buf);
        }
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n");
        format!("--- last {n} lines of {} (pid {}, {}) ---\n{tail}", self.name, self.pid, self.log_path.display())
    }

    /// The underlying tokio child, e.g. to `wait().await` for its exit status.
    pub fn child_mut(&mut self) -> &mut tokio::process::Child {
        &mut self.child
    }

    /// `Some(status)` once the child has exited (reaps it), `None` while it runs.
    pub fn try_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Whether the child (the group leader) is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    /// SIGKILLs the child's whole process group and reaps the child, waiting
    /// (up to 10 s) until it is gone, so its ports and files are released
    /// when this returns. Idempotent.
    pub fn kill(&mut self) {
        let pgid = Pid::from_raw(self.pid as i32);
        // The group may outlive its leader (grandchildren): kill it even if
        // the leader already exited.
        let _ = killpg(pgid, Signal::SIGKILL);
        if self.killed {
            return;
        }
        let _ = nix_kill(pgid, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("harness: {} (pid {}) not reaped 10 s after SIGKILL", self.name, self.pid);
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        self.killed = true;
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        let keep = std::thread::panicking()
            || std::env::var_os("COMFY_MULTI_KEEP_LOGS").is_some_and(|v| !v.is_empty() && v != "0");
        if keep {
            self.log_dir.disable_cleanup(true);
            eprintln!("harness: log of {} (pid {}) kept at {}", self.name, self.pid, self.log_path.display());
        }
    }
}

impl std::fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildGuard")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("log", &self.log_path)
            .finish()
    }
}

/// Fails fast with the log tail if `child` has exited.
fn ensure_running(child: &mut ChildGuard) -> anyhow::Result<()> {
    if let Some(status) = child.try_exit_status() {
        bail!("{} exited early ({status})\n{}", child.name(), child.log_tail(40));
    }
    Ok(())
}

/// The pid of a gpu-task running job `job_id`, whichever executor started
/// it: found by the `NOMAD_META_job_id` in its environment.
pub fn gpu_task_of(job_id: &str) -> Option<i32> {
    let needle = format!("NOMAD_META_job_id={job_id}");
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        environ.split(|b| *b == 0).any(|var| var == needle.as_bytes()).then_some(pid)
    })
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// A real `redis-server` on a free loopback port, with AOF on
/// (`appendfsync always`, as deployed, unless asked otherwise; no RDB snapshots) in its
/// own temp dir. SIGKILLed on drop.
pub struct Redis {
    /// `redis://127.0.0.1:PORT/`
    pub url: String,
    pub port: u16,
    /// The data dir (holds `appendonlydir/`).
    pub dir: PathBuf,
    appendfsync: &'static str,
    child: Option<ChildGuard>,
    _tmp: tempfile::TempDir,
}

impl Redis {
    /// Starts redis-server (`appendfsync always`, as deployed) and waits
    /// until it answers PING.
    pub async fn start() -> anyhow::Result<Redis> {
        Self::start_with_appendfsync("always").await
    }

    /// Starts redis-server with AOF policy `appendfsync` (`always`,
    /// `everysec`, `no`) and waits until it answers PING.
    pub async fn start_with_appendfsync(appendfsync: &'static str) -> anyhow::Result<Redis> {
        let tmp = tempfile::Builder::new().prefix("comfy-multi-redis-").tempdir()?;
        let port = free_port();
        let mut redis = Redis {
            url: format!("redis://127.0.0.1:{port}/"),
            port,
            dir: tmp.path().to_path_buf(),
            appendfsync,
            child: None,
            _tmp: tmp,
        };
        redis.spawn_and_wait().await?;
        Ok(redis)
    }

    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let mut cmd = tokio::process::Command::new(tool_path("redis-server"));
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", ""])
            .args(["--daemonize", "no", "--logfile", ""]);
        let mut child = spawn_logged(cmd, "redis-server");
        let port = self.port;
        let waited = wait_until("redis-server to answer PING", START_TIMEOUT, || {
            let early_exit = ensure_running(&mut child).err();
            async move {
                if let Some(e) = early_exit {
                    return Some(Err(e));
                }
                redis_ping(port).await.then_some(Ok(()))
            }
        })
        .await;
        match waited.and_then(|r| r) {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(e) => Err(anyhow!("{e:#}\n{}", child.log_tail(40))),
        }
    }

    /// The running server's process guard (for pid and logs).
    pub fn child(&self) -> Option<&ChildGuard> {
        self.child.as_ref()
    }

    /// SIGKILLs the server (no shutdown, no final fsync) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts the server again on the same port and dir (killing it first if
    /// it still runs); the AOF is replayed. Waits until PING answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn_and_wait().await
    }

    /// The tail of the server's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.child.as_ref().map(|c| c.log_tail(n)).unwrap_or_else(|| "(redis-server not running)".into())
    }
}

/// True if a Redis on 127.0.0.1:`port` answers `PING` with `+PONG`.
async fn redis_ping(port: u16) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n") {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Some(got.starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt).await.ok().flatten().unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Consul
// ---------------------------------------------------------------------------

/// A real `consul agent -dev` (1.8.7) bound to 127.0.0.1 with every port
/// free-chosen (DNS and gRPC disabled). SIGKILLed on drop.
pub struct Consul {
    /// `http://127.0.0.1:PORT`
    pub addr: String,
    pub http_port: u16,
    pub server_port: u16,
    pub serf_lan_port: u16,
    pub serf_wan_port: u16,
    /// The node name (`comfy-multi-test-<http port>`).
    pub node: String,
    child: ChildGuard,
    http: reqwest::Client,
}

impl Consul {
    /// Starts the dev agent and waits until it has elected itself leader.
    pub async fn start() -> anyhow::Result<Consul> {
        let http_port = free_port();
        let server_port = free_port();
        let serf_lan_port = free_port();
        let serf_wan_port = free_port();
        let node = format!("comfy-multi-test-{http_port}");
        let mut cmd = tokio::process::Command::new(tool_path("consul"));
        cmd.args(["agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1"])
            .arg(format!("-http-port={http_port}"))
            .arg(format!("-server-port={server_port}"))
            .arg(format!("-serf-lan-port={serf_lan_port}"))
            .arg(format!("-serf-wan-port={serf_wan_port}"))
            .args(["-dns-port=-1", "-grpc-port=-1", "-https-port=-1"])
            .arg(format!("-node={node}"))
            .args(["-hcl", "disable_update_check = true"]);
        let child = spawn_logged(cmd, "consul");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .context("build HTTP client")?;
        let mut consul = Consul {
            addr: format!("http://127.0.0.1:{http_port}"),
            http_port,
            server_port,
            serf_lan_port,
            serf_wan_port,
            node,
            child,
            http,
        };
        let leader_url = format!("{}/v1/status/leader", consul.addr);
        let waited = {
            let http = consul.http.clone();
            let child = &mut consul.child;
            wait_until("consul to elect a leader (/v1/status/leader)", START_TIMEOUT, || {
                let early_exit = ensure_running(child).err();
                let http = http.clone();
                let url = leader_url.clone();
                async move {
                    if let Some(e) = early_exit {
                        return Some(Err(e));
                    }
                    let body = http.get(&url).send().await.ok()?.text().await.ok()?;
                    let leader: String = serde_json::from_str(&body).ok()?;
                    (!leader.is_empty()).then_some(Ok(()))
                }
            })
            .await
        };
        if let Err(e) = waited.and_then(|r| r) {
            bail!("{e:#}\n{}", consul.child.log_tail(40));
        }
        Ok(consul)
    }

    /// Registers a service with the local agent (`PUT /v1/agent/service/register`)
    /// at 127.0.0.1:`port`, with an optional HTTP health check on `http_check`
    /// (interval 1 s, timeout 1 s).
    pub async fn register_service(
        &self,
        name: &str,
        id: &str,
        port: u16,
        tags: &[&str],
        http_check: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut body = serde_json::json!({
            "Name": name,
            "ID": id,
            "Address": "127.0.0.1",
            "Port": port,
            "Tags": tags,
        });
        if let Some(url) = http_check {
            body["Check"] = serde_json::json!({
                "CheckID": format!("service:{id}"),
                "Name": format!("{name} HTTP"),
                "HTTP": url,
                "Interval": "1s",
                "Timeout": "1s",
            });
        }
        let url = format!("{}/v1/agent/service/register", self.addr);
        let resp = self.http.put(&url).json(&body).send().await.with_context(|| format!("PUT {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            bail!("PUT {url} for service {name}/{id}: {status}: {text}");
        }
        Ok(())
    }

    /// Removes a service from the local agent (`PUT /v1/agent/service/deregister/<id>`).
    pub async fn deregister_service(&self, id: &str) -> anyhow::Result<()> {
        let url = format!("{}/v1/agent/service/deregister/{}", self.addr, urlencoding::encode(id));
        let resp = self.http.put(&url).send().await.with_context(|| format!("PUT {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!("PUT {url}: {status}: {}", resp.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// The instances of `name` whose checks all pass
    /// (`GET /v1/health/service/<name>?passing=true`), as Consul returns them.
    pub async fn passing(&self, name: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let url = format!("{}/v1/health/service/{}?passing=true", self.addr, urlencoding::encode(name));
        let resp = self.http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!("GET {url}: {status}: {}", resp.text().await.unwrap_or_default());
        }
        resp.json().await.with_context(|| format!("GET {url}: body is not a JSON array"))
    }

    /// Waits (up to 30 s) until at least one instance of `name` is passing.
    pub async fn wait_passing(&self, name: &str) -> anyhow::Result<()> {
        let what = format!("consul service `{name}` to be passing");
        let res = wait_until(&what, START_TIMEOUT, || async {
            self.passing(name).await.ok().filter(|list| !list.is_empty()).map(|_| ())
        })
        .await;
        res.map_err(|e| anyhow!("{e:#}\n{}", self.child.log_tail(20)))
    }

    /// The agent's process guard (for pid and logs).
    pub fn child(&self) -> &ChildGuard {
        &self.child
    }

    /// SIGKILLs the agent and waits until it is gone.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// The tail of the agent's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.child.log_tail(n)
    }
}

// ---------------------------------------------------------------------------
// Tests of the harness itself (they need redis-server and consul installed:
// scripts/install-deps.sh)
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        TcpListener::bind(("127.0.0.1", a)).expect("free port is bindable");
    }

    #[tokio::test]
    async fn wait_until_returns_value_and_times_out_with_name() {
        let mut n = 0;
        let v = wait_until("counter to reach 3", Duration::from_secs(5), || {
            n += 1;
            let n = n;
            async move { (n >= 3).then_some(n) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);

        let err = wait_until("never", Duration::from_millis(100), || async { None::<()> })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("never") && err.contains("100ms"), "{err}");
    }

    #[tokio::test]
    async fn child_guard_logs_tees_stdout_and_kills_its_process_group() {
        use tokio::io::AsyncBufReadExt;
        // A shell that starts a grandchild in the same group, prints, and waits.
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "sleep 300 & echo grandchild=$!; echo hello-from-child >&2; echo listening on here; wait"]);
        let mut guard = spawn_logged(&mut cmd, "sh/test");
        assert_eq!(cmd.get_program(), "sh", "a &mut std Command is given back intact");
        assert_eq!(guard.name(), "sh_test");

        // stdout, live, from its first byte.
        let mut lines = tokio::io::BufReader::new(guard.take_stdout().expect("first take")).lines();
        assert!(guard.take_stdout().is_none());
        let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap().unwrap();
        let grandchild: i32 = first.strip_prefix("grandchild=").expect(&first).parse().unwrap();
        let second = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap();
        assert_eq!(second.as_deref(), Some("listening on here"));

        // ... and everything, stdout and stderr, in the log.
        wait_until("the log to hold stdout and stderr", Duration::from_secs(10), || {
            let log = guard.log();
            async move { (log.contains("hello-from-child") && log.contains("listening on here")).then_some(()) }
        })
        .await
        .unwrap();
        assert!(guard.log_tail(5).contains("hello-from-child"));
        assert!(guard.is_running());

        guard.kill();
        assert!(!guard.is_running());
        // The tee ends once the group is dead.
        let end = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap();
        assert_eq!(end, None);
        // The grandchild (reparented to init or a subreaper) dies too.
        wait_until("grandchild to be gone", Duration::from_secs(10), || async move {
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).ok();
            // Gone, or a zombie waiting for its (non-us) reaper.
            match stat {
                None => Some(()),
                Some(s) => s.rsplit(')').next().and_then(|rest| rest.trim().starts_with('Z').then_some(())),
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn redis_aof_survives_kill_and_restart() {
        let mut redis = Redis::start().await.unwrap();
        let client = redis::Client::open(redis.url.as_str()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET").arg("harness:key").arg("survives").query_async(&mut con).await.unwrap();
        drop(con);
        // always: the write is in the AOF file, fsynced, before Redis answers.
        let aof_dir = redis.dir.join("appendonlydir");
        wait_until("the SET to reach the AOF", Duration::from_secs(10), || {
            let found = std::fs::read_dir(&aof_dir).ok().is_some_and(|entries| {
                entries.flatten().any(|e| {
                    std::fs::read(e.path()).is_ok_and(|b| b.windows(12).any(|w| w == b"harness:key\r"))
                })
            });
            async move { found.then_some(()) }
        })
        .await
        .unwrap();
        let old_pid = redis.child().unwrap().pid();
        redis.kill();
        assert!(!redis_ping(redis.port).await, "killed redis must not answer");
        redis.restart().await.unwrap();
        assert_ne!(redis.child().unwrap().pid(), old_pid);
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let v: Option<String> = redis::cmd("GET").arg("harness:key").query_async(&mut con).await.unwrap();
        assert_eq!(v.as_deref(), Some("survives"), "{}", redis.log_tail(20));
    }

    /// A tiny HTTP server answering 200 to everything; returns its port.
    async fn ok_server() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                        .await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn consul_service_with_http_check_becomes_passing() {
        let consul = Consul::start().await.unwrap();
        let port = ok_server().await;
        let check = format!("http://127.0.0.1:{port}/health");
        consul
            .register_service("harness-svc", "harness-svc-1", port, &["gpu-0", "test"], Some(&check))
            .await
            .unwrap();
        consul.wait_passing("harness-svc").await.unwrap();
        let list = consul.passing("harness-svc").await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["Service"]["ID"], "harness-svc-1");
        assert_eq!(list[0]["Service"]["Port"], port);
        assert_eq!(list[0]["Service"]["Tags"], serde_json::json!(["gpu-0", "test"]));

        // A service whose check fails is never listed as passing.
        let dead = free_port();
        consul
            .register_service("harness-dead", "harness-dead-1", dead, &[], Some(&format!("http://127.0.0.1:{dead}/")))
            .await
            .unwrap();
        let err = wait_until("dead service passing", Duration::from_millis(2500), || async {
            consul.passing("harness-dead").await.ok().filter(|l| !l.is_empty())
        })
        .await;
        assert!(err.is_err(), "a service failing its check must not pass");

        consul.deregister_service("harness-svc-1").await.unwrap();
        wait_until("deregistered service to leave the catalog", Duration::from_secs(10), || async {
            consul.passing("harness-svc").await.ok().filter(|l| l.is_empty()).map(|_| ())
        })
        .await
        .unwrap();
    }
}
