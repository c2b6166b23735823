//! Health of the parts comfy-multi depends on, seen from where it is known.
//!
//! Each service observes what it talks to and writes what it saw to Redis,
//! so that the gateway's `/healthz` and the instructor's page can say what is
//! down, and since when, without calling every part themselves:
//!
//! - the dispatcher records whether its executor (Nomad) answers, and writes
//!   a heartbeat every [`HEARTBEAT_EVERY`] that expires after
//!   [`HEARTBEAT_TTL`]: no heartbeat means "dispatcher not running";
//! - the gateway records whether gpu-task could reach ComfyUI (from its
//!   reports), and checks Redis and Consul itself.
//!
//! [`Component`] is the fixed list of parts, with stable lowercase names (the
//! JSON keys of `/healthz`, and the label values of a metrics gauge:
//! [`Report::gauges`]).
//!
//! # Redis keys
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `cm:health` | hash | component name → [`Observation`] (JSON) |
//! | `cm:dispatcher:heartbeat` | string | the last heartbeat (ms since the epoch), with a TTL |

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};

use crate::job::now_ms;
use crate::queue::{QueueError, Store};

/// How often a running dispatcher writes its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A heartbeat older than this (the key expires) means the dispatcher is not running.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(20);

const HEALTH: &str = "cm:health";
const HEARTBEAT: &str = "cm:dispatcher:heartbeat";

/// The parts whose health is tracked. The names are stable: they are JSON
/// keys and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Redis,
    Nomad,
    Consul,
    Comfyui,
    Dispatcher,
}

impl Component {
    /// Every component, in display order.
    pub const ALL: [Component; 5] =
        [Component::Redis, Component::Nomad, Component::Consul, Component::Comfyui, Component::Dispatcher];

    /// The stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Redis => "redis",
            Component::Nomad => "nomad",
            Component::Consul => "consul",
            Component::Comfyui => "comfyui",
            Component::Dispatcher => "dispatcher",
        }
    }

    /// How people call it.
    pub fn title(self) -> &'static str {
        match self {
            Component::Redis => "Redis",
            Component::Nomad => "Nomad",
            Component::Consul => "Consul",
            Component::Comfyui => "ComfyUI",
            Component::Dispatcher => "The dispatcher",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a component works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Up,
    Down,
    /// Nobody could tell (not configured, or not observed yet).
    Unknown,
}

impl Status {
    /// The value of a metrics gauge: 1 up, 0 down, -1 unknown.
    pub fn gauge(self) -> i64 {
        match self {
            Status::Up => 1,
            Status::Down => 0,
            Status::Unknown => -1,
        }
    }
}

/// What was last seen of one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub status: Status,
    /// Since when it has had this status (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// When it was last observed (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<u64>,
    /// Why it is down, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Observation {
    pub(crate) fn unknown(why: &str) -> Observation {
        Observation { status: Status::Unknown, since: None, observed: None, error: Some(why.into()) }
    }
    pub(crate) fn now(result: Result<(), String>) -> Observation {
        let now = now_ms();
        match result {
            Ok(()) => Observation { status: Status::Up, since: Some(now), observed: Some(now), error: None },
            Err(e) => Observation { status: Status::Down, since: Some(now), observed: Some(now), error: Some(e) },
        }
    }
    /// One sentence for a banner, when it is down: "Nomad unreachable since 12:03:04 UTC: …".
    pub fn sentence(&self, component: Component) -> Option<String> {
        if self.status != Status::Down {
            return None;
        }
        let since = self.since.map(|ms| format!(" since {}", clock(ms))).unwrap_or_default();
        let what = match component {
            Component::Dispatcher => "is not running",
            _ => "is unreachable",
        };
        let error = self.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
        Some(format!("{} {what}{since}{error}", component.title()))
    }
}

/// `HH:MM:SS UTC` of a time in ms since the epoch.
fn clock(ms: u64) -> String {
    let secs = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Records `result` as the latest observation of `component`; `since` moves
/// only when the status changes. Atomic (one Lua script).
pub async fn record(store: &Store, component: Component, result: Result<(), String>) -> Result<(), QueueError> {
    let obs = Observation::now(result);
    const LUA: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
local new = cjson.decode(ARGV[2])
if old then
  local ok, prev = pcall(cjson.decode, old)
  if ok and type(prev) == 'table' and prev.status == new.status and prev.since then new.since = prev.since end
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(new))
return 1
"#;
    let json = serde_json::to_string(&obs).expect("an observation serializes");
    let _: i64 = Script::new(LUA)
        .key(HEALTH)
        .arg(component.as_str())
        .arg(json)
        .invoke_async(&mut store.connection())
        .await?;
    Ok(())
}

/// Writes the dispatcher's heartbeat (expires after [`HEARTBEAT_TTL`]).
pub async fn heartbeat(store: &Store) -> Result<(), QueueError> {
    let _: () = store.connection().set_ex(HEARTBEAT, now_ms(), HEARTBEAT_TTL.as_secs()).await?;
    Ok(())
}

/// The health of every component, as far as it is known.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub components: BTreeMap<Component, Observation>,
}

impl Report {
    /// The status of `component`.
    pub fn status(&self, component: Component) -> Status {
        self.components.get(&component).map_or(Status::Unknown, |o| o.status)
    }

    /// One gauge value per component ([`Status::gauge`]), for metrics.
    pub fn gauges(&self) -> Vec<(Component, i64)> {
        Component::ALL.iter().map(|c| (*c, self.status(*c).gauge())).collect()
    }

    /// A sentence per component that is down, for a banner.
    pub fn problems(&self) -> Vec<String> {
        self.components.iter().filter_map(|(c, o)| o.sentence(*c)).collect()
    }
}

/// What the services wrote, plus what the caller checked itself: Redis
/// (`store` answers or not) and, when a Consul client is given, Consul.
/// `nomad_in_use` says whether the executor is Nomad (else Nomad is not
/// reported). Never fails: what cannot be read is reported down or unknown.
pub async fn gather(store: &Store, consul: Option<&crate::consul::ConsulClient>, nomad_in_use: bool) -> Report {
    let mut components = BTreeMap::new();
    let mut conn = store.connection();
    let stored: Result<(BTreeMap<String, String>, Option<u64>), redis::RedisError> =
        redis::pipe().hgetall(HEALTH).get(HEARTBEAT).query_async(&mut conn).await;
    let consul_check = async {
        match consul {
            Some(c) => Some(tokio::time::timeout(Duration::from_secs(2), c.reachable()).await.unwrap_or(false)),
            None => None,
        }
    };
    let consul_up = consul_check.await;
    match stored {
        Err(e) => {
            components.insert(Component::Redis, Observation::now(Err(e.to_string())));
            for c in [Component::Nomad, Component::Comfyui, Component::Dispatcher] {
                components.insert(c, Observation::unknown("Redis is down, where this is recorded"));
            }
        }
        Ok((seen, beat)) => {
            components.insert(Component::Redis, Observation::now(Ok(())));
            let read = |c: Component| {
                seen.get(c.as_str())
                    .and_then(|s| serde_json::from_str::<Observation>(s).ok())
                    .unwrap_or_else(|| Observation::unknown("not observed yet"))
            };
            if nomad_in_use {
                components.insert(Component::Nomad, read(Component::Nomad));
            }
            components.insert(Component::Comfyui, read(Component::Comfyui));
            components.insert(
                Component::Dispatcher,
                match beat {
                    Some(at) => Observation { status: Status::Up, since: None, observed: Some(at), error: None },
                    None => Observation {
                        status: Status::Down,
                        since: None,
                        observed: None,
                        error: Some(format!(
                            "no heartbeat for {} s; start it with `dispatcher run`",
                            HEARTBEAT_TTL.as_secs()
                        )),
                    },
                },
            );
        }
    }
    if let Some(up) = consul_up {
        let result = if up { Ok(()) } else { Err("no answer from the Consul agent".to_string()) };
        components.insert(Component::Consul, Observation::now(result));
    }
    Report { components }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_sentences_say_since_when() {
        let names: Vec<_> = Component::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names, ["redis", "nomad", "consul", "comfyui", "dispatcher"]);
        assert_eq!(serde_json::to_value(Component::Comfyui).unwrap(), "comfyui");
        let down = Observation {
            status: Status::Down,
            since: Some(3_723_000),
            observed: Some(3_724_000),
            error: Some("connection refused".into()),
        };
        assert_eq!(
            down.sentence(Component::Nomad).unwrap(),
            "Nomad is unreachable since 01:02:03 UTC: connection refused"
        );
        assert_eq!(Observation::now(Ok(())).sentence(Component::Nomad), None);
        assert_eq!((Status::Up.gauge(), Status::Down.gauge(), Status::Unknown.gauge()), (1, 0, -1));
    }
}
