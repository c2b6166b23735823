//! Small helpers of the Nomad stand-in: ids, clocks and Nomad's time formats.

use std::time::{SystemTime, UNIX_EPOCH};

/// A Nomad-style id (a UUID in 8-4-4-4-12 hex form).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> i64 {
    now_ns() / 1_000_000_000
}

/// Go's zero `time.Time`, as Nomad renders unset times.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A Unix-nanosecond time as Go's RFC 3339 with trimmed nanoseconds
/// (`2021-11-04T09:14:12.04996Z`); 0 renders as Go's zero time.
pub fn rfc3339(ns: i64) -> String {
    if ns <= 0 {
        return ZERO_TIME.to_string();
    }
    let secs = ns.div_euclid(1_000_000_000);
    let frac = ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if frac != 0 {
        let f = format!("{frac:09}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Nomad's env-var cleaning: characters outside `[A-Za-z0-9_.]` become `_`.
pub fn clean_env_key(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_like_go() {
        assert_eq!(rfc3339(0), ZERO_TIME);
        assert_eq!(
            rfc3339(1_636_017_252_049_960_000),
            "2021-11-04T09:14:12.04996Z"
        );
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn cleans_env_keys() {
        assert_eq!(clean_env_key("job-id.x y"), "job_id.x_y");
    }
}
