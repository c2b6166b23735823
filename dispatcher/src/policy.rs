//! Which queued job goes next: the one place that decides the order.
//!
//! - **Modes** (switchable live; the order is derived from the queue's state,
//!   so switching loses nothing): [`Mode::Fifo`], first come first served;
//!   [`Mode::Fair`], round-robin across users: the user served least recently
//!   goes next, and a user's own jobs keep their order.
//! - **Priority tiers** on top of either mode: a job's tier is the higher of
//!   its own and its user's; a higher tier always goes first.
//! - **Limits** ([`Limits`]): queued jobs per user and in all (checked at
//!   submit), running jobs per user (checked at every pop).
//!
//! The order is computed by one Lua function, [`PLAN_LUA`], inside Redis: the
//! queue's pop runs it to take the next job (atomically with marking it
//! dispatched), and [`crate::queue::Store::order`] runs it to show everyone's
//! position. Both therefore always agree.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How queued jobs are ordered within a priority tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// First come, first served.
    #[default]
    Fifo,
    /// Round-robin across users, least recently served first.
    Fair,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Fifo => "fifo",
            Mode::Fair => "fair",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mode name that is neither `fifo` nor `fair`.
#[derive(Debug, thiserror::Error)]
#[error("unknown scheduling mode {0:?}; use `fifo` or `fair`")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fifo" => Ok(Mode::Fifo),
            "fair" => Ok(Mode::Fair),
            other => Err(UnknownMode(other.to_string())),
        }
    }
}

/// Per-user and global limits. The configured values are defaults; the
/// instructor's changes (stored in Redis) win over them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// A user may have at most this many jobs waiting in the queue.
    pub max_queued_per_user: u32,
    /// A user may have at most this many jobs dispatched or running.
    pub max_running_per_user: u32,
    /// The whole queue holds at most this many jobs.
    pub max_queue: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_queued_per_user: 3, max_running_per_user: 1, max_queue: 500 }
    }
}

impl Limits {
    /// The Redis hash fields, in the order the Lua scripts read them.
    pub(crate) const FIELDS: [&'static str; 3] = ["max_queued_per_user", "max_running_per_user", "max_queue"];

    pub(crate) fn values(&self) -> [u32; 3] {
        [self.max_queued_per_user, self.max_running_per_user, self.max_queue]
    }
}

/// The highest priority tier (the instructor's "front").
pub const FRONT_TIER: i64 = 1;

/// Lua defining `plan(n, strict, max_running)`: the ids of the first `n`
/// queued jobs in dispatch order.
///
/// Each user's line is their queued jobs; a user's best job is their highest
/// tier, then lowest number. Among the users' best jobs the winner has the
/// highest tier, then (fair mode) the least recently served user, then the
/// lowest number. Picking a job counts as serving its user, so the plan is
/// the real round-robin. The running limit applies to the first pick (the
/// one `pop` takes now); later picks assume the jobs before them have ended.
/// With `strict` (pop) nothing is picked when every user with a line is at
/// the limit; otherwise (the order shown) such users simply come after.
pub(crate) const PLAN_LUA: &str = r#"
local function plan(n, strict, max_running)
  local mode = redis.call('GET', 'cm:mode') or 'fifo'
  local running = {}
  for _, id in ipairs(redis.call('SMEMBERS', 'cm:inflight')) do
    local u = redis.call('HGET', 'cm:job:' .. id, 'user')
    if u then running[u] = (running[u] or 0) + 1 end
  end
  local limited = true
  local lines = {}
  for _, u in ipairs(redis.call('SMEMBERS', 'cm:queued_users')) do
    local user_tier = tonumber(redis.call('HGET', 'cm:user_priority', u) or '0') or 0
    local ids = redis.call('ZRANGE', 'cm:uq:' .. u, 0, -1, 'WITHSCORES')
    local line = {}
    for i = 1, #ids, 2 do
      local key = 'cm:job:' .. ids[i]
      if redis.call('HGET', key, 'state') == 'queued' then
        local tier = tonumber(redis.call('HGET', key, 'priority') or '0') or 0
        if user_tier > tier then tier = user_tier end
        line[#line + 1] = { id = ids[i], number = tonumber(ids[i + 1]), tier = tier }
      end
    end
    if #line > 0 then lines[u] = line end
  end
  local served = {}
  local pairs_ = redis.call('HGETALL', 'cm:served')
  for i = 1, #pairs_, 2 do served[pairs_[i]] = tonumber(pairs_[i + 1]) end
  local seq = tonumber(redis.call('GET', 'cm:serve_seq') or '0')
  local out = {}
  while #out < n do
    local best, best_user, best_index
    for u, line in pairs(lines) do
      if #out > 0 or not limited or (running[u] or 0) < max_running then
        local cand, ci
        for i, j in ipairs(line) do
          if cand == nil or j.tier > cand.tier or (j.tier == cand.tier and j.number < cand.number) then
            cand, ci = j, i
          end
        end
        local better
        if best == nil then better = true
        elseif cand.tier ~= best.tier then better = cand.tier > best.tier
        elseif mode == 'fair' and (served[u] or 0) ~= (served[best_user] or 0) then
          better = (served[u] or 0) < (served[best_user] or 0)
        else better = cand.number < best.number end
        if better then best, best_user, best_index = cand, u, ci end
      end
    end
    if best == nil and #out == 0 and limited and not strict and next(lines) ~= nil then
      limited = false
    elseif best == nil then
      break
    else
      out[#out + 1] = best.id
      table.remove(lines[best_user], best_index)
      if #lines[best_user] == 0 then lines[best_user] = nil end
      seq = seq + 1
      served[best_user] = seq
    end
  end
  return out
end
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        assert_eq!("fair".parse::<Mode>().unwrap(), Mode::Fair);
        assert_eq!(Mode::Fifo.to_string(), "fifo");
        assert!("lifo".parse::<Mode>().unwrap_err().to_string().contains("fifo"));
    }

    #[test]
    fn workshop_defaults() {
        let l = Limits::default();
        assert_eq!((l.max_queued_per_user, l.max_running_per_user), (3, 1));
    }
}
