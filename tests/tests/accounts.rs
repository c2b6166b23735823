//! Participants' accounts, sessions and the login pages, through the real HTTP
//! surface of a real gateway process on a real Redis, and the real `gateway
//! users` CLI against the same Redis while the gateway runs.
//!
//! What must hold: a login sets an HttpOnly session cookie that authorises
//! exactly its participant; no credentials, a wrong code, an expired, revoked,
//! forged or foreign session never get in; account changes (create, reset,
//! disable, enable) apply to the running gateway at once; the instructor gets
//! in with the token or the password, participants never; failed logins are
//! rate-limited.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use comfy_multi_tests::harness::{bin_path, free_port, spawn_logged, wait_until, ChildGuard, Redis};
use reqwest::header::{COOKIE, LOCATION, RETRY_AFTER, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "admin-token-for-the-accounts-tests";
const ADMIN_PASSWORD: &str = "correct horse battery staple";

struct Gateway {
    url: String,
    http: reqwest::Client,
    redis_url: String,
    data_dir: std::path::PathBuf,
    env: Vec<(String, String)>,
    process: ChildGuard,
    _redis: Redis,
    _dir: tempfile::TempDir,
}

/// Credentials a request carries.
#[derive(Clone, Copy, Debug)]
enum Cred<'a> {
    None,
    Bearer(&'a str),
    /// A raw `Cookie` header value.
    Cookie(&'a str),
}

/// What a login answered.
struct LoginAnswer {
    status: StatusCode,
    location: Option<String>,
    /// The full `Set-Cookie` of the named cookie, if set.
    set_cookie: Option<String>,
    retry_after: Option<String>,
    body: String,
}

impl LoginAnswer {
    /// The cookie's value (the session id).
    fn session(&self) -> String {
        let set = self.set_cookie.as_deref().unwrap_or_else(|| panic!("no session cookie: {} {}", self.status, self.body));
        set.split(';').next().unwrap().split_once('=').unwrap().1.to_string()
    }
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

impl Gateway {
    async fn start(extra_env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let redis = Redis::start().await.unwrap();
        let data_dir = dir.path().join("data");
        let mut env: Vec<(String, String)> = vec![
            ("REDIS_URL".into(), redis.url.clone()),
            ("DATA_DIR".into(), data_dir.display().to_string()),
            ("PARTICIPANTS".into(), "5".into()),
            ("INTERNAL_SECRET".into(), "secret-for-tests".into()),
            ("ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ];
        env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let (url, process) = spawn_gateway(&env).await;
        Gateway { url, http: no_redirects(), redis_url: redis.url.clone(), data_dir, env, process, _redis: redis, _dir: dir }
    }

    /// Stops the gateway and starts a new one on the same Redis and data dir.
    async fn restart(&mut self) {
        self.process.kill();
        let (url, process) = spawn_gateway(&self.env).await;
        self.url = url;
        self.process = process;
    }

    /// The latest code of each participant in the handout (a reset appends).
    fn codes(&self) -> HashMap<u32, String> {
        handout(&self.data_dir)
    }

    fn code(&self, n: u32) -> String {
        self.codes().remove(&n).unwrap_or_else(|| panic!("no code for participant {n}"))
    }

    async fn get(&self, path: &str, cred: Cred<'_>) -> (StatusCode, Value) {
        let mut req = self.http.get(format!("{}{path}", self.url));
        req = match cred {
            Cred::None => req,
            Cred::Bearer(t) => req.bearer_auth(t),
            Cred::Cookie(c) => req.header(COOKIE, c),
        };
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// `GET /user/{n}/api/history` with `cred`.
    async fn history(&self, n: u32, cred: Cred<'_>) -> (StatusCode, Value) {
        self.get(&format!("/user/{n}/api/history"), cred).await
    }

    async fn post_form(&self, path: &str, form: &[(&str, &str)], cookie_name: &str, cookie: Option<&str>) -> LoginAnswer {
        let mut req = self.http.post(format!("{}{path}", self.url)).form(form);
        if let Some(c) = cookie {
            req = req.header(COOKIE, c);
        }
        answer(req.send().await.unwrap(), cookie_name).await
    }

    async fn login(&self, n: u32, code: &str) -> LoginAnswer {
        self.post_form("/login", &[("user", &n.to_string()), ("code", code)], "cm_session", None).await
    }

    /// Logs in and returns the `Cookie` header that carries the session.
    async fn session(&self, n: u32) -> String {
        let code = self.code(n);
        let a = self.login(n, &code).await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "login of {n}: {}", a.body);
        format!("cm_session={}", a.session())
    }

    async fn admin_login(&self, secret: &str) -> LoginAnswer {
        self.post_form("/admin/login", &[("secret", secret)], "cm_admin", None).await
    }

    /// `gateway users ...` with the gateway's environment.
    async fn users(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(bin_path("gateway"));
        cmd.arg("users").args(args).env_remove("COMFY_MULTI_CONFIG").env_remove("ADMIN_PASSWORD");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().await.unwrap()
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }
}

async fn spawn_gateway(env: &[(String, String)]) -> (String, ChildGuard) {
    let port = free_port();
    let mut cmd = tokio::process::Command::new(bin_path("gateway"));
    cmd.arg("serve")
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("COMFY_MULTI_CONFIG")
        .env_remove("SESSION_HOURS")
        .env_remove("ADMIN_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut process = spawn_logged(cmd, "gateway");
    let url = format!("http://127.0.0.1:{port}");
    let health = format!("{url}/healthz");
    let up = wait_until("the gateway to be healthy", Duration::from_secs(30), || {
        let health = health.clone();
        async move { reqwest::get(health).await.ok().filter(|r| r.status().is_success()) }
    })
    .await;
    if let Err(e) = up {
        panic!("{e:#}\n{}", process.log_tail(30));
    }
    assert!(process.is_running());
    (url, process)
}

async fn answer(res: reqwest::Response, cookie_name: &str) -> LoginAnswer {
    let header = |name| res.headers().get(name).map(|v: &reqwest::header::HeaderValue| v.to_str().unwrap().to_string());
    let location = header(LOCATION);
    let retry_after = header(RETRY_AFTER);
    let prefix = format!("{cookie_name}=");
    let set_cookie = res
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|v| v.starts_with(&prefix));
    let status = res.status();
    let body = res.text().await.unwrap();
    LoginAnswer { status, location, set_cookie, retry_after, body }
}

fn handout(data_dir: &Path) -> HashMap<u32, String> {
    std::fs::read_to_string(data_dir.join("secrets/access-codes.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, c)| (n.parse().unwrap(), c.to_string()))
        .collect()
}

/// ComfyUI's error shape, with a message that contains `needle`.
fn assert_comfy_error(body: &Value, needle: &str) {
    assert!(body["error"]["type"].is_string(), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
    assert!(body["node_errors"].is_object(), "{body}");
}

fn flip_last(id: &str) -> String {
    let mut s = id.to_string();
    let last = s.pop().unwrap();
    s.push(if last == '0' { '1' } else { '0' });
    s
}

/// Every route a participant has (both prefixes, as ComfyUI registers them).
fn user_paths(n: u32) -> Vec<String> {
    let id = uuid::Uuid::new_v4();
    let mut paths = Vec::new();
    for prefix in [format!("/user/{n}/api"), format!("/user/{n}")] {
        for p in ["prompt", "queue", "history", &format!("history/{id}"), "view?filename=x.png&type=output"] {
            paths.push(format!("{prefix}/{p}"));
        }
    }
    paths
}

#[tokio::test]
async fn a_login_cookie_authorises_exactly_its_participant() {
    let gw = Gateway::start(&[]).await;

    // The page: a plain form, no script needed.
    let (status, page) = gw.get("/login", Cred::None).await;
    assert_eq!(status, StatusCode::OK);
    let page = page.as_str().unwrap().to_string();
    assert!(page.contains(r#"<form method="post" action="/login">"#), "{page}");
    assert!(page.contains(r#"name="user""#) && page.contains(r#"name="code""#), "{page}");
    assert!(!page.contains("<script"), "{page}");

    // A login sets an HttpOnly, SameSite=Lax session cookie and redirects to the user's page.
    let code2 = gw.code(2);
    let a = gw.login(2, &code2).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert_eq!(a.location.as_deref(), Some("/user/2/"));
    let set = a.set_cookie.clone().unwrap();
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(set.split("; ").any(|p| p == attr), "{attr} missing in {set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: no Secure flag: {set}");
    let id = a.session();
    assert_eq!(id.len(), 64);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    let cookie2 = format!("cm_session={id}");

    // Redis keeps only a hash of the id, with a TTL of at most 12 h.
    let mut con = gw.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("cm:session:*").query_async(&mut con).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(!keys[0].contains(&id), "the session id itself must not be stored");
    let all: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut con).await.unwrap();
    assert!(all.iter().all(|k| !k.contains(&id)), "{all:?}");
    let value: String = redis::cmd("GET").arg(&keys[0]).query_async(&mut con).await.unwrap();
    assert_eq!(value, "user:2");
    let pttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut con).await.unwrap();
    assert!(pttl > 0 && pttl <= 12 * 3600 * 1000, "{pttl}");

    // The cookie authorises participant 2's API, reading and writing.
    let (status, body) = gw.history(2, Cred::Cookie(&cookie2)).await;
    assert_eq!((status, &body), (StatusCode::OK, &json!({})));
    let res = gw
        .http
        .post(format!("{}/user/2/api/prompt", gw.url))
        .header(COOKIE, &cookie2)
        .json(&json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let job: Value = res.json().await.unwrap();
    let job_id = job["prompt_id"].as_str().unwrap().to_string();
    let (status, _) = gw.get(&format!("/user/2/api/history/{job_id}"), Cred::Cookie(&cookie2)).await;
    assert_eq!(status, StatusCode::OK);
    // ... among other cookies, too.
    let (status, _) = gw.history(2, Cred::Cookie(&format!("theme=dark; {cookie2}; lang=en"))).await;
    assert_eq!(status, StatusCode::OK);

    // Not another participant's: every route, both prefixes.
    for path in user_paths(3) {
        let (status, body) = gw.get(&path, Cred::Cookie(&cookie2)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert_comfy_error(&body, "logged in as participant 2");
    }
    // A number that does not exist is 404, as for a bearer code.
    let (status, body) = gw.history(9, Cred::Cookie(&cookie2)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_comfy_error(&body, "no participant 9");
    // Participant 3 cannot see 2's job even with its own session.
    let cookie3 = gw.session(3).await;
    let (status, _) = gw.get(&format!("/user/3/api/history/{job_id}"), Cred::Cookie(&cookie3)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // No credentials: 401 on every route, telling how to log in.
    for path in user_paths(2) {
        let (status, body) = gw.get(&path, Cred::None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert_comfy_error(&body, "/login");
    }

    // Bearer codes work as before; a wrong one does not.
    assert_eq!(gw.history(2, Cred::Bearer(&code2)).await.0, StatusCode::OK);
    let (status, body) = gw.history(3, Cred::Bearer(&code2)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_comfy_error(&body, "wrong access code");

    // Forged cookies: random, tampered, malformed, or a session id under the admin cookie's name.
    let random = format!("cm_session={}", "ab".repeat(32));
    let tampered = format!("cm_session={}", flip_last(&id));
    let short = format!("cm_session={}", &id[..40]);
    let as_admin = format!("cm_admin={id}");
    for forged in [random.as_str(), &tampered, &short, "cm_session=", "cm_session=../../etc", &as_admin] {
        let (status, body) = gw.history(2, Cred::Cookie(forged)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{forged}: {body}");
        assert_comfy_error(&body, "log in");
    }
    let (status, _) = gw.get("/admin/api/whoami", Cred::Cookie(&as_admin)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Wrong code or unknown participant: 401 page with the reason, no cookie.
    let a = gw.login(2, "aaaa-bbbb-cccc").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.set_cookie.is_none());
    assert!(a.body.contains("not right"), "{}", a.body);
    assert!(a.body.contains(r#"value="2""#), "the number stays filled in: {}", a.body);
    let a = gw.login(9, &code2).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.body.contains("no participant 9"), "{}", a.body);
    let a = gw.login(3, &code2).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "2's code does not log in 3");
    let a = gw.post_form("/login", &[("user", "two"), ("code", &code2)], "cm_session", None).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.set_cookie.is_none());

    // Logout (POST) revokes the session at once and clears the cookie.
    let a = gw.post_form("/logout", &[], "cm_session", Some(&cookie2)).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.location.as_deref(), Some("/login"));
    assert!(a.set_cookie.as_deref().is_some_and(|c| c.contains("Max-Age=0")), "{:?}", a.set_cookie);
    let (status, body) = gw.history(2, Cred::Cookie(&cookie2)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_comfy_error(&body, "log in again");
    // Participant 3's session is untouched; GET /logout (a link) works too.
    assert_eq!(gw.history(3, Cred::Cookie(&cookie3)).await.0, StatusCode::OK);
    let (status, _) = gw.get("/logout", Cred::Cookie(&cookie3)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(gw.history(3, Cred::Cookie(&cookie3)).await.0, StatusCode::UNAUTHORIZED);
    let keys: Vec<String> = redis::cmd("KEYS").arg("cm:session:*").query_async(&mut con).await.unwrap();
    assert!(keys.is_empty(), "logged-out sessions stay in Redis: {keys:?}");
}

#[tokio::test]
async fn a_session_expires_after_its_ttl() {
    // 0.0005 h = 1.8 s.
    let gw = Gateway::start(&[("SESSION_HOURS", "0.0005")]).await;
    let a = gw.login(4, &gw.code(4)).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert!(a.set_cookie.as_deref().unwrap().contains("Max-Age=1"), "{:?}", a.set_cookie);
    let cookie = format!("cm_session={}", a.session());
    let mut con = gw.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("cm:session:*").query_async(&mut con).await.unwrap();
    assert_eq!(keys.len(), 1);
    let pttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut con).await.unwrap();
    assert!(pttl > 0 && pttl <= 1800, "the configured TTL is on the key: {pttl}");

    // Nothing but Redis's TTL removes it; then the cookie is refused.
    let body = wait_until("the session to expire", Duration::from_secs(30), || {
        let cookie = cookie.clone();
        let gw = &gw;
        async move {
            let (status, body) = gw.history(4, Cred::Cookie(&cookie)).await;
            (status == StatusCode::UNAUTHORIZED).then_some(body)
        }
    })
    .await
    .unwrap();
    assert_comfy_error(&body, "expired");
    let exists: bool = redis::cmd("EXISTS").arg(&keys[0]).query_async(&mut con).await.unwrap();
    assert!(!exists);
    // Logging in again works.
    let a = gw.login(4, &gw.code(4)).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn the_users_cli_changes_accounts_of_a_running_gateway() {
    let mut gw = Gateway::start(&[]).await;

    // list: 5 participants, never a code.
    let out = gw.users(&["list", "--json"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 5, "{list}");
    assert_eq!(list[0], json!({"user": 1, "enabled": true, "has_code": true, "created": list[0]["created"]}));
    assert!(list[0]["created"].as_u64().is_some());
    let codes = gw.codes();
    let text = String::from_utf8_lossy(&gw.users(&["list"]).await.stdout).to_string();
    assert!(codes.values().all(|c| !text.contains(c.as_str())), "list shows no codes: {text}");
    assert_eq!(text.lines().count(), 6, "{text}");

    // create: participant 6, usable at once without a restart.
    assert_eq!(gw.history(6, Cred::Bearer(ADMIN_TOKEN)).await.0, StatusCode::NOT_FOUND);
    let out = gw.users(&["create"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    let (n, code6) = line.trim().split_once(':').unwrap();
    assert_eq!(n, "6");
    let code6 = code6.to_string();
    assert_eq!(gw.code(6), code6, "appended to the handout");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(gw.data_dir.join("secrets/access-codes.txt")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(gw.history(6, Cred::Bearer(&code6)).await.0, StatusCode::OK);
    let cookie6 = gw.session(6).await;
    assert_eq!(gw.history(6, Cred::Cookie(&cookie6)).await.0, StatusCode::OK);
    assert_eq!(gw.history(7, Cred::Bearer(ADMIN_TOKEN)).await.0, StatusCode::NOT_FOUND);

    // reset: the old code and live sessions stop working at once; the new code works.
    let old2 = gw.code(2);
    let cookie2 = gw.session(2).await;
    assert_eq!(gw.history(2, Cred::Cookie(&cookie2)).await.0, StatusCode::OK);
    let out = gw.users(&["reset", "2"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    let new2 = line.trim().strip_prefix("2:").unwrap().to_string();
    assert_ne!(new2, old2);
    assert_eq!(gw.code(2), new2, "the handout's last line for 2 is the new code");
    assert_eq!(gw.history(2, Cred::Bearer(&old2)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(gw.history(2, Cred::Cookie(&cookie2)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(gw.login(2, &old2).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(gw.history(2, Cred::Bearer(&new2)).await.0, StatusCode::OK);
    let cookie2 = gw.session(2).await;
    assert_eq!(gw.history(2, Cred::Cookie(&cookie2)).await.0, StatusCode::OK);

    // disable: 403 at once for code and session, login refused; the instructor still gets in.
    let code3 = gw.code(3);
    let cookie3 = gw.session(3).await;
    let out = gw.users(&["disable", "3"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for cred in [Cred::Bearer(&code3), Cred::Cookie(&cookie3)] {
        let (status, body) = gw.history(3, cred).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{cred:?}: {body}");
        assert_comfy_error(&body, "disabled");
        assert_eq!(body["error"]["type"], "account_disabled");
    }
    let a = gw.login(3, &code3).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.set_cookie.is_none());
    assert!(a.body.contains("disabled"), "{}", a.body);
    assert_eq!(gw.history(3, Cred::Bearer(ADMIN_TOKEN)).await.0, StatusCode::OK);
    assert_eq!(gw.history(2, Cred::Cookie(&cookie2)).await.0, StatusCode::OK, "others are unaffected");
    let list: Value = serde_json::from_slice(&gw.users(&["list", "--json"]).await.stdout).unwrap();
    assert_eq!(list[2]["enabled"], false);
    assert_eq!(list.as_array().unwrap().len(), 6);

    // enable: the code works again; the old session stays ended.
    let out = gw.users(&["enable", "3"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(gw.history(3, Cred::Bearer(&code3)).await.0, StatusCode::OK);
    assert_eq!(gw.history(3, Cred::Cookie(&cookie3)).await.0, StatusCode::UNAUTHORIZED);
    let cookie3 = gw.session(3).await;
    assert_eq!(gw.history(3, Cred::Cookie(&cookie3)).await.0, StatusCode::OK);

    // Unknown numbers: a clear error and a failing exit status.
    for args in [&["reset", "99"][..], &["disable", "7"], &["enable", "0"]] {
        let out = gw.users(args).await;
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("no participant {}", args[1])) && err.contains("1..=6"), "{args:?}: {err}");
    }

    // A restart with PARTICIPANTS=5 keeps participant 6 (never lowered) and every session.
    gw.restart().await;
    assert_eq!(gw.history(6, Cred::Bearer(&code6)).await.0, StatusCode::OK);
    assert_eq!(gw.history(6, Cred::Cookie(&cookie6)).await.0, StatusCode::OK);
    assert_eq!(gw.history(2, Cred::Bearer(&new2)).await.0, StatusCode::OK);
    assert_eq!(gw.codes().len(), 6, "no codes were regenerated");
}

#[tokio::test]
async fn the_instructor_logs_in_with_the_token_or_the_password() {
    let gw = Gateway::start(&[("ADMIN_PASSWORD", ADMIN_PASSWORD)]).await;

    // Not the instructor: no credentials, a participant's code or session.
    let cookie1 = gw.session(1).await;
    let code1 = gw.code(1);
    for cred in [Cred::None, Cred::Bearer(&code1), Cred::Cookie(&cookie1), Cred::Bearer(ADMIN_PASSWORD)] {
        let (status, body) = gw.get("/admin/api/whoami", cred).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{cred:?}: {body}");
        assert_comfy_error(&body, "");
    }
    let (status, body) = gw.get("/admin/api/whoami", Cred::Bearer(ADMIN_TOKEN)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"admin": true, "via": "token"})));

    // The page, then a wrong secret.
    let (status, page) = gw.get("/admin/login", Cred::None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.as_str().unwrap().contains(r#"type="password""#));
    let a = gw.admin_login("not-it").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.set_cookie.is_none());
    let a = gw.admin_login(&code1).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "a participant's code is not an admin secret");

    // Token and password each give an admin session.
    for secret in [ADMIN_TOKEN, ADMIN_PASSWORD] {
        let a = gw.admin_login(secret).await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
        assert_eq!(a.location.as_deref(), Some("/admin/"));
        let set = a.set_cookie.clone().unwrap();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Lax"), "{set}");
        let admin = format!("cm_admin={}", a.session());
        let (status, body) = gw.get("/admin/api/whoami", Cred::Cookie(&admin)).await;
        assert_eq!((status, body), (StatusCode::OK, json!({"admin": true, "via": "session"})));
        // The instructor's session acts as any participant, like the token.
        assert_eq!(gw.history(4, Cred::Cookie(&admin)).await.0, StatusCode::OK);
        // ... but the same id as a participant cookie is nothing.
        let swapped = format!("cm_session={}", a.session());
        assert_eq!(gw.history(4, Cred::Cookie(&swapped)).await.0, StatusCode::UNAUTHORIZED);
        // Logout ends it.
        let out = gw.post_form("/admin/logout", &[], "cm_admin", Some(&admin)).await;
        assert_eq!(out.status, StatusCode::SEE_OTHER);
        assert_eq!(out.location.as_deref(), Some("/admin/login"));
        assert_eq!(gw.get("/admin/api/whoami", Cred::Cookie(&admin)).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(gw.history(4, Cred::Cookie(&admin)).await.0, StatusCode::UNAUTHORIZED);
    }

    // Without ADMIN_PASSWORD configured, no password works (the default gateway of the other tests).
    let plain = Gateway::start(&[]).await;
    assert_eq!(plain.admin_login(ADMIN_PASSWORD).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(plain.admin_login("").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(plain.admin_login(ADMIN_TOKEN).await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn failed_logins_are_rate_limited() {
    let gw = Gateway::start(&[]).await;
    let code4 = gw.code(4);

    // Ten failures for participant 4, then even the right code is refused for a while.
    for i in 0..10 {
        let a = gw.login(4, &format!("wrong-{i}")).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let a = gw.login(4, &code4).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert!(a.set_cookie.is_none());
    assert!(a.body.contains("Too many failed logins"), "{}", a.body);
    let wait: u64 = a.retry_after.as_deref().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // The API with the code is not affected, nor is another participant's login.
    assert_eq!(gw.history(4, Cred::Bearer(&code4)).await.0, StatusCode::OK);
    assert_eq!(gw.login(5, &gw.code(5)).await.status, StatusCode::SEE_OTHER);

    // The admin login has its own limit.
    for _ in 0..10 {
        assert_eq!(gw.admin_login("guess").await.status, StatusCode::UNAUTHORIZED);
    }
    let a = gw.admin_login(ADMIN_TOKEN).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);

    // One address spraying many accounts: after 30 failures in all, everyone is refused from it.
    for i in 0..10 {
        assert_eq!(gw.login(1, &format!("wrong-{i}")).await.status, StatusCode::UNAUTHORIZED);
    }
    let a = gw.login(5, &gw.code(5)).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
}

#[tokio::test]
async fn cookies_are_secure_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    let redis = Redis::start().await.unwrap();
    let port = free_port();
    let data_dir = dir.path().join("data");
    let mut cmd = tokio::process::Command::new(bin_path("gateway"));
    cmd.arg("serve")
        .env("REDIS_URL", &redis.url)
        .env("DATA_DIR", &data_dir)
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("PARTICIPANTS", "2")
        .env("GATEWAY_TLS_CERT", &cert_path)
        .env("GATEWAY_TLS_KEY", &key_path)
        .env_remove("SESSION_HOURS")
        .env_remove("COMFY_MULTI_CONFIG");
    let _process = spawn_logged(cmd, "gateway-tls");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("https://localhost:{port}");
    wait_until("the gateway to answer over HTTPS", Duration::from_secs(30), || {
        let req = client.get(format!("{base}/healthz"));
        async move { req.send().await.ok().filter(|r| r.status().is_success()) }
    })
    .await
    .unwrap();
    let code = handout(&data_dir).remove(&1).unwrap();
    let res = client.post(format!("{base}/login")).form(&[("user", "1"), ("code", code.as_str())]).send().await.unwrap();
    let a = answer(res, "cm_session").await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    let set = a.set_cookie.clone().unwrap();
    assert!(set.split("; ").any(|p| p == "Secure"), "{set}");
    let res = client
        .get(format!("{base}/user/1/api/history"))
        .header(COOKIE, format!("cm_session={}", a.session()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}
