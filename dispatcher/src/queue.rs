//! Redis storage of jobs and of the queue.
//!
//! Everything that must not be torn by a crash or a concurrent writer is one
//! Lua script, so it runs atomically in Redis: submitting (number + record +
//! queue entry), taking the next job (pop + mark dispatched), changing a state
//! (compare-and-set against [`JobState::sources`]), attaching an output
//! (only while the job is in flight, once per file).
//!
//! # Schema
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `cm:seq` | string | last submission number |
//! | `cm:job:<id>` | hash | the job record (JSON blobs for workflow, extra_data, messages) |
//! | `cm:job:<id>:outputs` | hash | `node \t kind \t index` → `{filename, subfolder, type}` |
//! | `cm:queue` | zset | queued job ids, by number |
//! | `cm:uq:<n>` | zset | user n's queued job ids, by number (their line) |
//! | `cm:queued_users` | set | users with a line |
//! | `cm:inflight` | set | dispatched or running job ids |
//! | `cm:user:<n>:jobs` | zset | every job of user n, by number |
//! | `cm:jobs` | zset | every job, by number (reports) |
//! | `cm:mode` | string | the scheduling [`Mode`] (`fifo` when absent) |
//! | `cm:limits` | hash | the instructor's [`Limits`] (config defaults when absent) |
//! | `cm:user_priority` | hash | user → priority tier |
//! | `cm:served` | hash | user → serve sequence number of their last dispatch (fair mode) |
//! | `cm:serve_seq` | string | last serve sequence number |
//! | `cm:runtimes` | list | run times (ms) of the last 50 succeeded jobs, newest first |
//! | `cm:seen` | hash | user → last time (ms) they were heard from |
//! | `cm:paused` | string | present while dispatching is paused (drain); says why |
//! | `cm:job:<id>` field `run_error` | | why the current run could not do the job (gpu-task's retryable report); cleared on requeue |
//! | `cm:health`, `cm:dispatcher:heartbeat` | | see [`crate::health`] |
//! | `cm:wake` | channel | published on every submit, requeue and resume, so dispatchers wake |
//! | `cm:stop` | channel | executor refs whose run must be stopped by the dispatcher that runs them |
//! | `cm:events:<n>` | channel | progress events for user n's open editors; also [`JOB_ENDED_EVENT`] on every end of one of n's jobs |

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde_json::Value;

use crate::job::{now_ms, FileRef, Job, JobId, JobState, Outputs};
use crate::policy::{Limits, Mode, FRONT_TIER, PLAN_LUA};

/// Lua returning the table `counts` (key → number) as a flat array of pairs.
const RETURN_COUNTS: &str = "
local out = {}
for k, n in pairs(counts) do out[#out + 1] = k; out[#out + 1] = n end
return out
";
/// Channel dispatchers subscribe to, to learn of new work at once.
pub const WAKE_CHANNEL: &str = "cm:wake";
/// Channel of executor refs whose run must be stopped (drain, cancel).
pub const STOP_CHANNEL: &str = "cm:stop";
/// Present while dispatching is paused.
const PAUSED: &str = "cm:paused";
/// Type of the event published on `cm:events:<n>` (in the same atomic step)
/// whenever one of user n's jobs ends: `{"type": JOB_ENDED_EVENT, "data":
/// {"prompt_id": id, "from": state, "state": state}}`. The gateway turns it
/// into a fresh `status` (and, if gpu-task could not say so, the end of the
/// prompt) for n's editors; it is never forwarded as such.
pub const JOB_ENDED_EVENT: &str = "comfy_multi.job_ended";

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("Redis error ({0}); is Redis running and REDIS_URL right?")]
    Redis(#[from] redis::RedisError),
    #[error("job {0} does not exist")]
    NotFound(JobId),
    #[error("job {id} is {from}; it cannot become {to}")]
    Transition { id: JobId, from: JobState, to: JobState },
    #[error("job {id} is stored damaged: {why}")]
    Corrupt { id: JobId, why: String },
    #[error("you already have {limit} workflows waiting, the most one participant may; wait until one starts, or cancel one")]
    UserQueueFull { limit: u32 },
    #[error("the queue is full ({limit} workflows waiting); try again in a few minutes")]
    QueueFull { limit: u32 },
}

/// What a participant submits.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub user: u32,
    pub workflow: Value,
    pub extra_data: Value,
    pub priority: i64,
}

/// Fields to change together with a state transition.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    pub error: Option<String>,
    pub executor_ref: Option<String>,
    pub messages: Option<Vec<Value>>,
    /// Sets the number of runs (a dispatch that never reached the executor
    /// gives its attempt back).
    pub attempts: Option<u32>,
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// It was queued: it is now `cancelled`.
    Removed,
    /// It is in flight: its run is being stopped and it ends `cancelled`.
    Stopping,
    /// It had already ended, in this state.
    AlreadyEnded(JobState),
}

/// Handle on the Redis store. Cheap to clone; reconnects by itself.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    client: redis::Client,
    limits: Limits,
}

fn job_key(id: &JobId) -> String {
    format!("cm:job:{id}")
}
fn outputs_key(id: &JobId) -> String {
    format!("cm:job:{id}:outputs")
}
fn user_key(user: u32) -> String {
    format!("cm:user:{user}:jobs")
}
/// Channel of user `n`'s progress events.
pub fn events_channel(user: u32) -> String {
    format!("cm:events:{user}")
}
const QUEUE: &str = "cm:queue";
const INFLIGHT: &str = "cm:inflight";
const SEQ: &str = "cm:seq";

/// Reads a limit: the instructor's value, else the configured default.
const LIMIT_LUA: &str = r#"
local function limit(name, default)
  local v = redis.call('HGET', 'cm:limits', name)
  if v then return tonumber(v) end
  return tonumber(default)
end
"#;

/// ARGV: id, user, default max_queued_per_user, default max_queue, field/value pairs.
const SUBMIT_LUA: &str = r#"
local user = ARGV[2]
local max_queued = limit('max_queued_per_user', ARGV[3])
if redis.call('ZCARD', 'cm:uq:' .. user) >= max_queued then return {-1, max_queued} end
local max_queue = limit('max_queue', ARGV[4])
if redis.call('ZCARD', 'cm:queue') >= max_queue then return {-2, max_queue} end
local n = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], 'number', n, 'state', 'queued', unpack(ARGV, 5))
redis.call('ZADD', KEYS[3], n, ARGV[1])
redis.call('ZADD', KEYS[4], n, ARGV[1])
redis.call('ZADD', 'cm:uq:' .. user, n, ARGV[1])
redis.call('SADD', 'cm:queued_users', user)
redis.call('ZADD', 'cm:jobs', n, ARGV[1])
redis.call('PUBLISH', 'cm:wake', ARGV[1])
return {n, 0}
"#;

/// Removes job `id` of `user` from the queue (both indexes).
const UNQUEUE_LUA: &str = r#"
local function unqueue(id, user)
  redis.call('ZREM', 'cm:queue', id)
  redis.call('ZREM', 'cm:uq:' .. user, id)
  if redis.call('ZCARD', 'cm:uq:' .. user) == 0 then redis.call('SREM', 'cm:queued_users', user) end
end
"#;

const TRANSITION_LUA: &str = r#"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do if s == state then allowed = true end end
if not allowed then return {0, state} end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local to = ARGV[1]
local user = redis.call('HGET', KEYS[1], 'user')
if to == 'queued' then
  local number = redis.call('HGET', KEYS[1], 'number')
  redis.call('ZADD', KEYS[2], number, ARGV[4])
  redis.call('ZADD', 'cm:uq:' .. user, number, ARGV[4])
  redis.call('SADD', 'cm:queued_users', user)
  redis.call('SREM', KEYS[3], ARGV[4])
  redis.call('PUBLISH', 'cm:wake', ARGV[4])
elseif to == 'dispatched' or to == 'running' then
  unqueue(ARGV[4], user)
  redis.call('SADD', KEYS[3], ARGV[4])
else
  unqueue(ARGV[4], user)
  redis.call('SREM', KEYS[3], ARGV[4])
  redis.call('PUBLISH', 'cm:events:' .. user, '{"type":"comfy_multi.job_ended","data":{"prompt_id":"' .. ARGV[4] .. '","from":"' .. state .. '","state":"' .. to .. '"}}')
  if to == 'succeeded' then
    local started = tonumber(redis.call('HGET', KEYS[1], 'started_at') or '')
    if started then
      redis.call('LPUSH', 'cm:runtimes', tonumber(ARGV[2]) - started)
      redis.call('LTRIM', 'cm:runtimes', 0, 49)
    end
  end
end
return {1, state}
"#;

/// ARGV: id, owner (or ''). Returns {code, state, executor_ref}: code 1 =
/// removed from the queue, 2 = stop requested, 0 = already ended, -1 = not
/// found (or not the owner's).
const CANCEL_LUA: &str = r#"
local key = 'cm:job:' .. ARGV[1]
local state = redis.call('HGET', key, 'state')
local user = redis.call('HGET', key, 'user')
if not state or (ARGV[2] ~= '' and user ~= ARGV[2]) then return {-1, '', ''} end
if state == 'queued' then
  redis.call('HSET', key, 'state', 'cancelled', 'finished_at', ARGV[3], 'error', 'cancelled')
  unqueue(ARGV[1], user)
  redis.call('PUBLISH', 'cm:events:' .. user, '{"type":"comfy_multi.job_ended","data":{"prompt_id":"' .. ARGV[1] .. '","from":"queued","state":"cancelled"}}')
  return {1, state, ''}
elseif state == 'dispatched' or state == 'running' then
  redis.call('HSET', key, 'cancel_requested', '1')
  return {2, state, redis.call('HGET', key, 'executor_ref') or ''}
end
return {0, state, ''}
"#;

const ADD_OUTPUT_LUA: &str = r#"
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'dispatched' and state ~= 'running' then return {0, state or ''} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1, state}
"#;

/// The scripts every submit, dispatch, state change and progress event runs,
/// built (and their SHA1 computed) once.
static SUBMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{LIMIT_LUA}{SUBMIT_LUA}")));
static POP_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!("{LIMIT_LUA}{PLAN_LUA}{UNQUEUE_LUA}{POP_LUA}"))
});
static TRANSITION_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{UNQUEUE_LUA}{TRANSITION_LUA}")));
static USER_PENDING_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(USER_PENDING_LUA));
static SET_IF_IN_FLIGHT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SET_IF_IN_FLIGHT_LUA));

/// ARGV: now, default max_running_per_user. Returns the id taken, or nil.
const POP_LUA: &str = r#"
if redis.call('EXISTS', 'cm:paused') == 1 then return false end
local chosen = plan(1, true, limit('max_running_per_user', ARGV[2]))[1]
if not chosen then return false end
local key = 'cm:job:' .. chosen
local user = redis.call('HGET', key, 'user')
unqueue(chosen, user)
redis.call('HSET', key, 'state', 'dispatched', 'dispatched_at', ARGV[1])
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('SADD', 'cm:inflight', chosen)
redis.call('HSET', 'cm:served', user, redis.call('INCR', 'cm:serve_seq'))
return chosen"#;

/// KEYS: the user's line, the in-flight set; ARGV: user.
const USER_PENDING_LUA: &str = r#"
local n = redis.call('ZCARD', KEYS[1])
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HGET', 'cm:job:' .. id, 'user') == ARGV[1] then n = n + 1 end
end
return n"#;

/// KEYS: the job. ARGV: field, value. Sets the field only while the job is in flight.
const SET_IF_IN_FLIGHT_LUA: &str = r#"
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'dispatched' or state == 'running' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0"#;

impl Store {
    /// Connects to Redis at `url` (the connection is re-established by itself
    /// after a Redis restart).
    pub async fn connect(url: &str) -> Result<Store, QueueError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(Store { conn, client, limits: Limits::default() })
    }

    /// Uses `limits` as the defaults (the instructor's changes in Redis win).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// A connection for the modules that own other keys ([`crate::health`]).
    pub(crate) fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The underlying client, for pub/sub connections.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Queues a new job and returns it.
    pub async fn submit(&self, new: NewJob) -> Result<Job, QueueError> {
        let id = JobId::new_v4();
        let created_at = now_ms();
        let fields: Vec<(&str, String)> = vec![
            ("id", id.to_string()),
            ("user", new.user.to_string()),
            ("workflow", new.workflow.to_string()),
            ("extra_data", new.extra_data.to_string()),
            ("priority", new.priority.to_string()),
            ("created_at", created_at.to_string()),
            ("attempts", "0".into()),
        ];
        let mut inv = SUBMIT_SCRIPT.prepare_invoke();
        inv.key(SEQ)
            .key(job_key(&id))
            .key(QUEUE)
            .key(user_key(new.user))
            .arg(id.to_string())
            .arg(new.user)
            .arg(self.limits.max_queued_per_user)
            .arg(self.limits.max_queue);
        for (k, v) in &fields {
            inv.arg(*k).arg(v);
        }
        let (number, limit): (i64, u32) = inv.invoke_async(&mut self.conn.clone()).await?;
        match number {
            -1 => return Err(QueueError::UserQueueFull { limit }),
            -2 => return Err(QueueError::QueueFull { limit }),
            _ => {}
        }
        let number = number as u64;
        Ok(Job {
            id,
            user: new.user,
            number,
            workflow: new.workflow,
            extra_data: new.extra_data,
            state: JobState::Queued,
            priority: new.priority,
            created_at,
            dispatched_at: None,
            started_at: None,
            finished_at: None,
            outputs: Outputs::new(),
            error: None,
            attempts: 0,
            executor_ref: None,
            messages: Vec::new(),
            cancel_requested: false,
            progress: None,
        })
    }

    /// The job, or `None` if there is no such job.
    pub async fn get(&self, id: &JobId) -> Result<Option<Job>, QueueError> {
        Ok(self.get_many(std::slice::from_ref(id)).await?.pop())
    }

    /// The jobs `ids` that exist, in that order, read in one round trip
    /// (a pipeline of at most [`READ_BATCH`] jobs at a time).
    pub async fn get_many(&self, ids: &[JobId]) -> Result<Vec<Job>, QueueError> {
        let mut jobs = Vec::with_capacity(ids.len());
        let mut conn = self.conn.clone();
        for batch in ids.chunks(READ_BATCH) {
            let mut pipe = redis::pipe();
            for id in batch {
                pipe.hgetall(job_key(id)).hgetall(outputs_key(id));
            }
            let replies: Vec<BTreeMap<String, String>> = pipe.query_async(&mut conn).await?;
            let mut replies = replies.into_iter();
            for id in batch {
                let (Some(fields), Some(outputs)) = (replies.next(), replies.next()) else { break };
                if !fields.is_empty() {
                    jobs.push(decode_job(id, fields, outputs)?);
                }
            }
        }
        Ok(jobs)
    }

    /// Atomically takes the next job in policy order (respecting the
    /// running limit per user and the pause flag) and marks it dispatched.
    pub async fn pop_next(&self) -> Result<Option<Job>, QueueError> {
        let id: Option<String> = POP_SCRIPT
            .arg(now_ms())
            .arg(self.limits.max_running_per_user)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match id {
            None => Ok(None),
            Some(id) => {
                let id: JobId = id
                    .parse()
                    .map_err(|e| QueueError::Corrupt { id: JobId::nil(), why: format!("queue entry {id:?}: {e}") })?;
                self.get(&id).await?.ok_or(QueueError::NotFound(id)).map(Some)
            }
        }
    }

    /// Every queued job's id, in the order they will be dispatched.
    pub async fn order(&self) -> Result<Vec<JobId>, QueueError> {
        let lua = format!(
            "{LIMIT_LUA}{PLAN_LUA}{}",
            "return plan(redis.call('ZCARD', 'cm:queue'), false, limit('max_running_per_user', ARGV[1]))"
        );
        let ids: Vec<String> = Script::new(&lua)
            .arg(self.limits.max_running_per_user)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// Cancels job `id`; with `owner`, only if it is that user's (otherwise
    /// it is reported as not found). A job in flight is marked
    /// `cancel_requested` and its run asked to stop; it ends `cancelled` when
    /// the run has stopped.
    pub async fn cancel(&self, id: &JobId, owner: Option<u32>) -> Result<Cancelled, QueueError> {
        let lua = format!("{UNQUEUE_LUA}{CANCEL_LUA}");
        let (code, state, executor_ref): (i64, String, String) = Script::new(&lua)
            .arg(id.to_string())
            .arg(owner.map(|u| u.to_string()).unwrap_or_default())
            .arg(now_ms())
            .invoke_async(&mut self.conn.clone())
            .await?;
        match code {
            1 => Ok(Cancelled::Removed),
            2 => {
                if !executor_ref.is_empty() {
                    self.request_stop(&executor_ref).await?;
                }
                Ok(Cancelled::Stopping)
            }
            0 => Ok(Cancelled::AlreadyEnded(
                state.parse().map_err(|e: crate::job::UnknownState| QueueError::Corrupt { id: *id, why: e.to_string() })?,
            )),
            _ => Err(QueueError::NotFound(*id)),
        }
    }

    /// Stores `mode` as the scheduling mode unless the instructor chose one
    /// already (every service calls this at start with its configured default).
    pub async fn init_mode(&self, mode: Mode) -> Result<(), QueueError> {
        let _: bool = self.conn.clone().set_nx("cm:mode", mode.as_str()).await?;
        Ok(())
    }

    /// The scheduling mode.
    pub async fn mode(&self) -> Result<Mode, QueueError> {
        let mode: Option<String> = self.conn.clone().get("cm:mode").await?;
        Ok(mode.and_then(|m| m.parse().ok()).unwrap_or_default())
    }

    /// Switches the scheduling mode; the queue keeps every job.
    pub async fn set_mode(&self, mode: Mode) -> Result<(), QueueError> {
        let _: () = self.conn.clone().set("cm:mode", mode.as_str()).await?;
        Ok(())
    }

    /// The limits in force: the instructor's, else the configured defaults.
    pub async fn limits(&self) -> Result<Limits, QueueError> {
        let stored: Vec<Option<u32>> =
            redis::cmd("HMGET").arg("cm:limits").arg(&Limits::FIELDS[..]).query_async(&mut self.conn.clone()).await?;
        let d = self.limits.values();
        Ok(Limits {
            max_queued_per_user: stored[0].unwrap_or(d[0]),
            max_running_per_user: stored[1].unwrap_or(d[1]),
            max_queue: stored[2].unwrap_or(d[2]),
        })
    }

    /// Sets the limits in force (the instructor's change; survives restarts).
    pub async fn set_limits(&self, limits: Limits) -> Result<(), QueueError> {
        let pairs: Vec<(&str, u32)> = Limits::FIELDS.iter().copied().zip(limits.values()).collect();
        let mut conn = self.conn.clone();
        let _: () = redis::pipe().hset_multiple("cm:limits", &pairs).publish(WAKE_CHANNEL, "limits").query_async(&mut conn).await?;
        Ok(())
    }

    /// Raises job `id` to the front tier (`true`) or back to normal.
    pub async fn raise_job(&self, id: &JobId, front: bool) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let exists: bool = conn.exists(job_key(id)).await?;
        if !exists {
            return Err(QueueError::NotFound(*id));
        }
        let _: () = conn.hset(job_key(id), "priority", if front { FRONT_TIER } else { 0 }).await?;
        Ok(())
    }

    /// Raises every job of `user` to the front tier (`true`) or back.
    pub async fn raise_user(&self, user: u32, front: bool) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        if front {
            let _: () = conn.hset("cm:user_priority", user, FRONT_TIER).await?;
        } else {
            let _: () = conn.hdel("cm:user_priority", user).await?;
        }
        Ok(())
    }

    /// Users raised to the front tier.
    pub async fn raised_users(&self) -> Result<Vec<u32>, QueueError> {
        let users: Vec<String> = self.conn.clone().hkeys("cm:user_priority").await?;
        Ok(users.iter().filter_map(|u| u.parse().ok()).collect())
    }

    /// Run times (ms) of the most recent succeeded jobs, newest first.
    pub async fn recent_runtimes(&self) -> Result<Vec<u64>, QueueError> {
        Ok(self.conn.clone().lrange("cm:runtimes", 0, -1).await?)
    }

    /// Every job ever submitted, oldest first (for reports).
    pub async fn all_jobs(&self) -> Result<Vec<Job>, QueueError> {
        let ids: Vec<String> = self.conn.clone().zrange("cm:jobs", 0, -1).await?;
        self.get_many(&parse_ids(&ids)).await
    }

    /// Moves job `id` to `to`, if the state machine allows it from the state
    /// it is in; sets the patch's fields and the matching timestamp in the
    /// same atomic step. Returns the state it left.
    pub async fn transition(&self, id: &JobId, to: JobState, patch: Patch) -> Result<JobState, QueueError> {
        let sources: Vec<&str> = JobState::sources(to).into_iter().map(JobState::as_str).collect();
        let now = now_ms().to_string();
        let mut fields: Vec<(&str, String)> = Vec::new();
        match to {
            JobState::Dispatched => fields.push(("dispatched_at", now)),
            JobState::Running => fields.push(("started_at", now)),
            JobState::Queued => {
                fields.push(("dispatched_at", String::new()));
                fields.push(("started_at", String::new()));
                fields.push(("executor_ref", String::new()));
                fields.push(("run_error", String::new()));
            }
            JobState::Succeeded => {
                fields.push(("finished_at", now));
                // A hiccup of an earlier attempt is not the result.
                fields.push(("error", String::new()));
            }
            _ => fields.push(("finished_at", now)),
        }
        if let Some(e) = patch.error {
            fields.push(("error", one_line(&e)));
        }
        if let Some(r) = patch.executor_ref {
            fields.push(("executor_ref", r));
        }
        if let Some(n) = patch.attempts {
            fields.push(("attempts", n.to_string()));
        }
        if let Some(m) = patch.messages {
            fields.push(("messages", Value::Array(m).to_string()));
        }
        let mut inv = TRANSITION_SCRIPT.prepare_invoke();
        inv.key(job_key(id))
            .key(QUEUE)
            .key(INFLIGHT)
            .arg(to.as_str())
            .arg(now_ms())
            .arg(sources.join(","))
            .arg(id.to_string());
        for (k, v) in &fields {
            inv.arg(*k).arg(v);
        }
        let (ok, from): (i64, String) = inv.invoke_async(&mut self.conn.clone()).await?;
        if from.is_empty() {
            return Err(QueueError::NotFound(*id));
        }
        let from: JobState = from
            .parse()
            .map_err(|e: crate::job::UnknownState| QueueError::Corrupt { id: *id, why: e.to_string() })?;
        if ok == 1 {
            Ok(from)
        } else {
            Err(QueueError::Transition { id: *id, from, to })
        }
    }

    /// Records where the executor runs the job (the Nomad child id), without
    /// changing its state.
    pub async fn set_executor_ref(&self, id: &JobId, executor_ref: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: () = conn.hset(job_key(id), "executor_ref", executor_ref).await?;
        Ok(())
    }

    /// Takes over a run the executor has for a job Redis says is queued
    /// (Redis lost the write of its dispatch): marks it running with
    /// `executor_ref` (its gpu-task may have reported its start already; a
    /// repeated start is fine), counting `attempt` runs, instead of running
    /// it again.
    /// Returns `false` (and changes nothing) when the job is not queued.
    pub async fn adopt(&self, id: &JobId, executor_ref: &str, attempt: u32) -> Result<bool, QueueError> {
        let lua = r#"
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return 0 end
local user = redis.call('HGET', KEYS[1], 'user')
unqueue(ARGV[1], user)
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') or 0
if tonumber(ARGV[3]) > attempts then attempts = tonumber(ARGV[3]) end
redis.call('HSET', KEYS[1], 'state', 'running', 'executor_ref', ARGV[2], 'attempts', attempts, 'dispatched_at', ARGV[4], 'started_at', ARGV[4])
redis.call('SADD', 'cm:inflight', ARGV[1])
return 1"#;
        let done: i64 = Script::new(&format!("{UNQUEUE_LUA}{lua}"))
            .key(job_key(id))
            .arg(id.to_string())
            .arg(executor_ref)
            .arg(attempt)
            .arg(now_ms())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(done == 1)
    }

    /// Notes why the current run of an in-flight job could not do it
    /// (gpu-task's retryable report, e.g. ComfyUI unreachable), without
    /// ending it: the dispatcher decides whether it runs again, with this
    /// reason. Ignored once the job is not in flight.
    pub async fn note_run_error(&self, id: &JobId, reason: &str) -> Result<(), QueueError> {
        self.set_if_in_flight(id, "run_error", &one_line(reason)).await
    }

    /// What [`Store::note_run_error`] noted for the current run, if anything.
    pub async fn run_error(&self, id: &JobId) -> Result<Option<String>, QueueError> {
        let v: Option<String> = self.conn.clone().hget(job_key(id), "run_error").await?;
        Ok(v.filter(|s| !s.is_empty()))
    }

    /// Attaches one output file to an in-flight job. The same (node, kind,
    /// index) twice is stored once. Returns `false` if the job is not in
    /// flight any more (the output is then not recorded).
    pub async fn add_output(
        &self,
        id: &JobId,
        node: &str,
        kind: &str,
        index: u32,
        file: &FileRef,
    ) -> Result<bool, QueueError> {
        let field = format!("{node}\t{kind}\t{index:010}");
        let value = serde_json::to_string(file).expect("FileRef serializes");
        let (ok, state): (i64, String) = Script::new(ADD_OUTPUT_LUA)
            .key(job_key(id))
            .key(outputs_key(id))
            .arg(field)
            .arg(value)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if state.is_empty() {
            return Err(QueueError::NotFound(*id));
        }
        Ok(ok == 1)
    }

    /// User `user`'s jobs, newest first, at most `limit`.
    pub async fn user_jobs(&self, user: u32, limit: usize) -> Result<Vec<Job>, QueueError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.zrevrange(user_key(user), 0, limit.max(1) as isize - 1).await?;
        self.get_many(&parse_ids(&ids)).await
    }

    /// User `user`'s jobs still to finish (queued, dispatched or running),
    /// newest first. Reads only those (the user's line and the few jobs in
    /// flight), however long the user's history is.
    pub async fn user_unfinished(&self, user: u32) -> Result<Vec<Job>, QueueError> {
        let (queued, inflight): (Vec<String>, Vec<String>) = redis::pipe()
            .atomic()
            .zrange(format!("cm:uq:{user}"), 0, -1)
            .smembers(INFLIGHT)
            .query_async(&mut self.conn.clone())
            .await?;
        let mut ids = parse_ids(&queued);
        for id in parse_ids(&inflight) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        let mut jobs: Vec<Job> = self
            .get_many(&ids)
            .await?
            .into_iter()
            .filter(|j| j.user == user && !j.state.is_terminal())
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.number));
        Ok(jobs)
    }

    /// How many of user `user`'s jobs are still to finish (queued, dispatched
    /// or running): their own `queue_remaining`.
    pub async fn user_pending(&self, user: u32) -> Result<u64, QueueError> {
        Ok(USER_PENDING_SCRIPT
            .key(format!("cm:uq:{user}"))
            .key(INFLIGHT)
            .arg(user)
            .invoke_async(&mut self.conn.clone())
            .await?)
    }

    /// Number of queued jobs.
    pub async fn queued_count(&self) -> Result<u64, QueueError> {
        Ok(self.conn.clone().zcard(QUEUE).await?)
    }

    /// How many jobs are in each state (states with none are absent).
    pub async fn count_by_state(&self) -> Result<std::collections::HashMap<JobState, u64>, QueueError> {
        let lua = r#"
local counts = {}
for _, id in ipairs(redis.call('ZRANGE', 'cm:jobs', 0, -1)) do
  local s = redis.call('HGET', 'cm:job:' .. id, 'state')
  if s then counts[s] = (counts[s] or 0) + 1 end
end
"#;
        let flat: Vec<(String, u64)> = Script::new(&format!("{lua}{RETURN_COUNTS}")).invoke_async(&mut self.conn.clone()).await?;
        Ok(flat.into_iter().filter_map(|(s, n)| Some((s.parse::<JobState>().ok()?, n))).collect())
    }

    /// Queued jobs per priority tier (a job's tier is the higher of its own
    /// and its user's, as [`crate::policy`] orders them).
    pub async fn queued_by_tier(&self) -> Result<BTreeMap<i64, u64>, QueueError> {
        let lua = r#"
local counts = {}
for _, id in ipairs(redis.call('ZRANGE', 'cm:queue', 0, -1)) do
  local key = 'cm:job:' .. id
  local tier = tonumber(redis.call('HGET', key, 'priority') or '0') or 0
  local u = redis.call('HGET', key, 'user')
  local user_tier = u and tonumber(redis.call('HGET', 'cm:user_priority', u) or '0') or 0
  if user_tier > tier then tier = user_tier end
  counts[tier] = (counts[tier] or 0) + 1
end
"#;
        let flat: Vec<(i64, u64)> = Script::new(&format!("{lua}{RETURN_COUNTS}")).invoke_async(&mut self.conn.clone()).await?;
        Ok(flat.into_iter().collect())
    }

    /// Ids of the jobs that are dispatched or running.
    pub async fn inflight(&self) -> Result<Vec<JobId>, QueueError> {
        let ids: Vec<String> = self.conn.clone().smembers(INFLIGHT).await?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// Publishes a progress event to user `user`'s editors.
    pub async fn publish_event(&self, user: u32, event: &Value) -> Result<(), QueueError> {
        let _: i64 = self.conn.clone().publish(events_channel(user), event.to_string()).await?;
        Ok(())
    }

    /// Stops all dispatching (atomically with respect to [`Store::pop_next`]):
    /// jobs in flight go on, queued jobs stay queued.
    pub async fn pause(&self, reason: &str) -> Result<(), QueueError> {
        let _: () = self.conn.clone().set(PAUSED, reason).await?;
        Ok(())
    }

    /// Lets dispatching continue, and wakes the dispatchers.
    pub async fn resume(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: () = redis::pipe().del(PAUSED).publish(WAKE_CHANNEL, "resume").query_async(&mut conn).await?;
        Ok(())
    }

    /// Why dispatching is paused, if it is.
    pub async fn paused(&self) -> Result<Option<String>, QueueError> {
        Ok(self.conn.clone().get(PAUSED).await?)
    }

    /// Asks the dispatcher whose executor runs `executor_ref` to stop it.
    pub async fn request_stop(&self, executor_ref: &str) -> Result<(), QueueError> {
        let _: i64 = self.conn.clone().publish(STOP_CHANNEL, executor_ref).await?;
        Ok(())
    }

    /// Records the latest progress of a job in flight (`{node, value, max}`),
    /// for the instructor's view. Ignored once the job has ended.
    pub async fn set_progress(&self, id: &JobId, progress: &Value) -> Result<(), QueueError> {
        self.set_if_in_flight(id, "progress", &progress.to_string()).await
    }

    /// Sets one field of a job's record, atomically, only while it is in flight.
    async fn set_if_in_flight(&self, id: &JobId, field: &str, value: &str) -> Result<(), QueueError> {
        let _: i64 = SET_IF_IN_FLIGHT_SCRIPT
            .key(job_key(id))
            .arg(field)
            .arg(value)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Notes that `user` was just heard from.
    pub async fn touch_user(&self, user: u32) -> Result<(), QueueError> {
        let _: () = self.conn.clone().hset("cm:seen", user, now_ms()).await?;
        Ok(())
    }

    /// When each user was last heard from (ms since the epoch).
    pub async fn last_seen(&self) -> Result<BTreeMap<u32, u64>, QueueError> {
        let seen: BTreeMap<String, u64> = self.conn.clone().hgetall("cm:seen").await?;
        Ok(seen.into_iter().filter_map(|(u, t)| Some((u.parse().ok()?, t))).collect())
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> bool {
        redis::cmd("PING").query_async::<String>(&mut self.conn.clone()).await.is_ok()
    }

    /// Keeps this store's connection alive ([`keep_alive`]).
    pub fn keep_alive(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        keep_alive(self.conn.clone(), every)
    }
}

/// How often the long-running services ping Redis ([`keep_alive`]).
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(1);

/// Pings `conn` every `every` for as long as the task runs. A connection to
/// a Redis that restarted is found dead only when a command fails on it (the
/// manager then reconnects in the background); with this, that command is a
/// ping, not a participant's request.
pub fn keep_alive(conn: ConnectionManager, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = redis::cmd("PING").query_async::<String>(&mut conn.clone()).await;
        }
    })
}

/// Jobs read per pipeline by [`Store::get_many`].
const READ_BATCH: usize = 256;

/// The ids in `raw` that parse (anything else in an index is skipped).
fn parse_ids(raw: &[String]) -> Vec<JobId> {
    raw.iter().filter_map(|id| id.parse().ok()).collect()
}

/// Errors are shown in one line (history, admin page, CLI).
fn one_line(s: &str) -> String {
    let line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        "unknown error".into()
    } else {
        line
    }
}

fn decode_job(
    id: &JobId,
    mut f: BTreeMap<String, String>,
    outputs: BTreeMap<String, String>,
) -> Result<Job, QueueError> {
    let corrupt = |why: String| QueueError::Corrupt { id: *id, why };
    let mut take = |k: &str| f.remove(k);
    fn num<T: std::str::FromStr>(v: Option<String>, k: &str) -> Result<Option<T>, String> {
        match v {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| format!("field {k} = {s:?} is not a number")),
        }
    }
    fn json(v: Option<String>, k: &str) -> Result<Value, String> {
        match v {
            None => Ok(Value::Null),
            Some(s) => serde_json::from_str(&s).map_err(|e| format!("field {k}: {e}")),
        }
    }
    let state = take("state")
        .ok_or_else(|| corrupt("no state".into()))?
        .parse::<JobState>()
        .map_err(|e| corrupt(e.to_string()))?;
    let user = num(take("user"), "user").map_err(corrupt)?.ok_or_else(|| corrupt("no user".into()))?;
    let messages = match json(take("messages"), "messages").map_err(corrupt)? {
        Value::Array(a) => a,
        _ => Vec::new(),
    };
    let mut out = Outputs::new();
    for (field, value) in outputs {
        let mut parts = field.splitn(3, '\t');
        let (Some(node), Some(kind)) = (parts.next(), parts.next()) else { continue };
        let file: FileRef = serde_json::from_str(&value).map_err(|e| corrupt(format!("output {field:?}: {e}")))?;
        out.entry(node.to_string()).or_default().entry(kind.to_string()).or_default().push(file);
    }
    Ok(Job {
        id: *id,
        user,
        number: num(take("number"), "number").map_err(corrupt)?.unwrap_or(0),
        workflow: json(take("workflow"), "workflow").map_err(corrupt)?,
        extra_data: json(take("extra_data"), "extra_data").map_err(corrupt)?,
        state,
        priority: num(take("priority"), "priority").map_err(corrupt)?.unwrap_or(0),
        created_at: num(take("created_at"), "created_at").map_err(corrupt)?.unwrap_or(0),
        dispatched_at: num(take("dispatched_at"), "dispatched_at").map_err(corrupt)?,
        started_at: num(take("started_at"), "started_at").map_err(corrupt)?,
        finished_at: num(take("finished_at"), "finished_at").map_err(corrupt)?,
        outputs: out,
        error: take("error").filter(|s| !s.is_empty()),
        attempts: num(take("attempts"), "attempts").map_err(corrupt)?.unwrap_or(0),
        executor_ref: take("executor_ref").filter(|s| !s.is_empty()),
        messages,
        cancel_requested: take("cancel_requested").is_some_and(|v| v == "1"),
        progress: take("progress").and_then(|p| serde_json::from_str(&p).ok()),
    })
}
