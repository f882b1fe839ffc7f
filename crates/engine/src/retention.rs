//! Retention policies: which snapshots `pagesnap forget` keeps, with restic's semantics.
//!
//! A pure function of the policy and the snapshots' ids and creation times (UTC, milliseconds
//! since the Unix epoch), so it is tested against fixed time lists with no clock at all. The CLI
//! applies it to each image name's snapshots on their own.
//!
//! The rules, as restic's `forget` applies them (`restic/internal/restic/snapshot_policy.go`):
//! the snapshots are taken newest first;
//! - `last N` keeps the N newest;
//! - `hourly/daily/weekly/monthly/yearly N` keep, for each of the N newest calendar periods (hour,
//!   day, ISO week, month, year, in UTC) *that have snapshots*, the newest snapshot of the period:
//!   a snapshot is kept when its period differs from that of the last snapshot the rule kept,
//!   until the rule has kept N;
//! - `within D` keeps every snapshot strictly newer than the newest snapshot's time minus D
//!   (years and months subtracted on the calendar, as Go's `AddDate` does: March 31 minus one
//!   month is March 3 in a non-leap year, then days, then hours).
//!
//! - as restic 0.17+ does, a rule (`last` or a period rule) that still has counts left when it
//!   reaches the oldest snapshot keeps that one too, even when the rule already kept a newer
//!   snapshot of its period: the history kept is then as long as it can be. Its reason is then
//!   `oldest <rule>` (restic's `oldest daily snapshot`), or the rule's own name when the oldest
//!   snapshot is the newest of its period anyway.
//!
//! A snapshot is kept if any rule keeps it, and its reasons list every rule that did. Not
//! implemented: restic's `unlimited` counts, `--keep-tag` and the `--keep-within-daily`-style
//! rules.

use pagesnap_store::SnapshotId;
use std::fmt;

/// A span for [`Policy::within`]: years, months, days and hours, as in `1y5m7d2h`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Within {
    /// Calendar years.
    pub years: u32,
    /// Calendar months.
    pub months: u32,
    /// Days.
    pub days: u32,
    /// Hours.
    pub hours: u32,
}

impl Within {
    /// Parses `1y5m7d2h`: each of `y`, `m`, `d`, `h` at most once, after a number, in any order.
    pub fn parse(text: &str) -> Result<Within, String> {
        let bad = |why: &str| {
            format!("bad duration '{text}': {why}; write it as years, months, days and hours, e.g. 1y5m7d2h, 30d or 12h")
        };
        let mut w = Within::default();
        let mut seen = [false; 4];
        let mut digits = String::new();
        for c in text.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let slot = match c {
                'y' => 0,
                'm' => 1,
                'd' => 2,
                'h' => 3,
                _ => return Err(bad(&format!("'{c}' is not a unit (y, m, d or h)"))),
            };
            if digits.is_empty() {
                return Err(bad(&format!("'{c}' has no number before it")));
            }
            if seen[slot] {
                return Err(bad(&format!("'{c}' is given twice")));
            }
            seen[slot] = true;
            let n: u32 = digits
                .parse()
                .map_err(|_| bad(&format!("{digits} is too large")))?;
            digits.clear();
            *[&mut w.years, &mut w.months, &mut w.days, &mut w.hours][slot] = n;
        }
        if !digits.is_empty() {
            return Err(bad(&format!("{digits} has no unit after it")));
        }
        if !seen.iter().any(|s| *s) {
            return Err(bad("it is empty"));
        }
        Ok(w)
    }

    /// True when it spans nothing (and so keeps nothing).
    pub fn is_zero(&self) -> bool {
        *self == Within::default()
    }
}

impl fmt::Display for Within {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        for (n, unit) in [
            (self.years, 'y'),
            (self.months, 'm'),
            (self.days, 'd'),
            (self.hours, 'h'),
        ] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
                any = true;
            }
        }
        if !any {
            write!(f, "0h")?;
        }
        Ok(())
    }
}

/// What to keep (0 or `None`: the rule is not used).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// The newest N snapshots.
    pub last: u32,
    /// The newest snapshot of each of the N newest hours that have snapshots.
    pub hourly: u32,
    /// … days.
    pub daily: u32,
    /// … ISO weeks (Monday to Sunday).
    pub weekly: u32,
    /// … months.
    pub monthly: u32,
    /// … years.
    pub yearly: u32,
    /// Every snapshot newer than the newest one's time minus this.
    pub within: Option<Within>,
}

impl Policy {
    /// True when no rule keeps anything: applying it would remove every snapshot, so `forget`
    /// refuses it.
    pub fn is_empty(&self) -> bool {
        self.last == 0
            && self.hourly == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
            && self.yearly == 0
            && self.within.is_none_or(|w| w.is_zero())
    }
}

/// Why a snapshot is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// One of the newest `last`.
    Last,
    /// The newest of its hour.
    Hourly,
    /// The newest of its day.
    Daily,
    /// The newest of its ISO week.
    Weekly,
    /// The newest of its month.
    Monthly,
    /// The newest of its year.
    Yearly,
    /// Within the span of the newest snapshot.
    Within(Within),
    /// The group's oldest snapshot, kept by a rule with counts left that had already kept a newer
    /// snapshot of the same period (restic 0.17+).
    Oldest(&'static Reason),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Last => write!(f, "last"),
            Reason::Hourly => write!(f, "hourly"),
            Reason::Daily => write!(f, "daily"),
            Reason::Weekly => write!(f, "weekly"),
            Reason::Monthly => write!(f, "monthly"),
            Reason::Yearly => write!(f, "yearly"),
            Reason::Within(w) => write!(f, "within {w}"),
            Reason::Oldest(r) => write!(f, "oldest {r}"),
        }
    }
}

/// The verdict on one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The snapshot.
    pub id: SnapshotId,
    /// Its creation time, ms since the Unix epoch (UTC).
    pub time_unix_ms: u64,
    /// The rules that keep it; empty: it is removed.
    pub reasons: Vec<Reason>,
}

impl Decision {
    /// Whether a rule keeps it.
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Applies `policy` to `snapshots` (id and creation time, any order): one decision per snapshot,
/// newest first (by time, then id). An empty policy keeps everything (callers refuse it first).
pub fn apply(policy: &Policy, snapshots: &[(SnapshotId, u64)]) -> Vec<Decision> {
    let mut list: Vec<(SnapshotId, u64)> = snapshots.to_vec();
    list.sort_by_key(|s| std::cmp::Reverse((s.1, s.0)));
    if policy.is_empty() {
        return list
            .into_iter()
            .map(|(id, t)| Decision {
                id,
                time_unix_ms: t,
                reasons: vec![Reason::Last],
            })
            .collect();
    }
    let bound = match (policy.within, list.first()) {
        (Some(w), Some(newest)) if !w.is_zero() => Some((w, minus(newest.1, w))),
        _ => None,
    };
    // (count left, the last period kept, what it buckets by, reason)
    type Bucket = fn(u64, usize) -> i64;
    let mut rules: Vec<(u32, Option<i64>, Bucket, Reason)> = vec![
        (policy.last, None, |_, nr| nr as i64, Reason::Last),
        (policy.hourly, None, |t, _| hour_of(t), Reason::Hourly),
        (policy.daily, None, |t, _| day_of(t), Reason::Daily),
        (policy.weekly, None, |t, _| week_of(t), Reason::Weekly),
        (policy.monthly, None, |t, _| month_of(t), Reason::Monthly),
        (policy.yearly, None, |t, _| civil(t).0, Reason::Yearly),
    ];
    let mut out = Vec::with_capacity(list.len());
    let oldest = list.len().saturating_sub(1);
    for (nr, (id, t)) in list.into_iter().enumerate() {
        let mut reasons = Vec::new();
        if let Some((w, b)) = bound {
            if i128::from(t) > b {
                reasons.push(Reason::Within(w));
            }
        }
        for (left, last, bucket, reason) in rules.iter_mut() {
            if *left == 0 {
                continue;
            }
            let period = bucket(t, nr);
            if *last != Some(period) {
                *last = Some(period);
                *left -= 1;
                reasons.push(*reason);
            } else if nr == oldest {
                // restic 0.17+: a rule with counts left keeps the oldest snapshot too.
                *left -= 1;
                reasons.push(Reason::Oldest(oldest_of(*reason)));
            }
        }
        out.push(Decision {
            id,
            time_unix_ms: t,
            reasons,
        });
    }
    out
}

/// `reason` as a `'static` reference, for [`Reason::Oldest`] (only the counted rules reach it).
fn oldest_of(reason: Reason) -> &'static Reason {
    match reason {
        Reason::Hourly => &Reason::Hourly,
        Reason::Daily => &Reason::Daily,
        Reason::Weekly => &Reason::Weekly,
        Reason::Monthly => &Reason::Monthly,
        Reason::Yearly => &Reason::Yearly,
        _ => &Reason::Last,
    }
}

const DAY_MS: i128 = 86_400_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (`d` may lie outside the month: it counts on).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day, hour) in UTC of a time in ms since the Unix epoch (proleptic Gregorian);
/// also what the CLI prints snapshot times with.
pub fn civil(ms: u64) -> (i64, i64, i64, i64) {
    let days = (ms / 86_400_000) as i64;
    let hour = (ms % 86_400_000 / 3_600_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d, hour)
}

fn hour_of(ms: u64) -> i64 {
    let (y, m, d, h) = civil(ms);
    y * 1_000_000 + m * 10_000 + d * 100 + h
}

fn day_of(ms: u64) -> i64 {
    let (y, m, d, _) = civil(ms);
    y * 10_000 + m * 100 + d
}

fn month_of(ms: u64) -> i64 {
    let (y, m, _, _) = civil(ms);
    y * 100 + m
}

/// ISO 8601 year × 100 + week (weeks start on Monday; week 1 holds the year's first Thursday).
fn week_of(ms: u64) -> i64 {
    let days = (ms / 86_400_000) as i64;
    // 1970-01-01 was a Thursday: weekday 1 (Monday) … 7 (Sunday).
    let weekday = (days + 3).rem_euclid(7) + 1;
    let thursday = days - (weekday - 1) + 3;
    let (iso_year, _, _, _) = civil(u64::try_from(thursday.max(0)).unwrap_or(0) * 86_400_000);
    let week = (thursday - days_from_civil(iso_year, 1, 1)) / 7 + 1;
    iso_year * 100 + week
}

/// `t` minus `w` on the calendar (Go's `AddDate(-y, -m, -d)` then minus the hours), in ms (may be
/// before 1970).
fn minus(t: u64, w: Within) -> i128 {
    let (y, m, d, _) = civil(t);
    let into_day = i128::from(t) % DAY_MS;
    let months = (y - i64::from(w.years)) * 12 + (m - 1) - i64::from(w.months);
    let (y2, m2) = (months.div_euclid(12), months.rem_euclid(12) + 1);
    let days = i128::from(days_from_civil(y2, m2, 1)) + i128::from(d - 1) - i128::from(w.days);
    days * DAY_MS + into_day - i128::from(w.hours) * 3_600_000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ms of a UTC date and time.
    fn at(y: i64, m: i64, d: i64, h: i64, min: i64) -> u64 {
        let days = days_from_civil(y, m, d);
        u64::try_from(days * 86_400_000 + h * 3_600_000 + min * 60_000).expect("after 1970")
    }

    #[test]
    fn calendar_arithmetic() {
        assert_eq!(civil(at(2016, 2, 29, 23, 59)), (2016, 2, 29, 23));
        assert_eq!(civil(0), (1970, 1, 1, 0));
        // ISO weeks: 2015-01-01 (Thu) is in 2015-W01; 2016-01-03 (Sun) in 2015-W53;
        // 2018-12-31 (Mon) in 2019-W01.
        assert_eq!(week_of(at(2015, 1, 1, 12, 0)), 201_501);
        assert_eq!(week_of(at(2016, 1, 3, 12, 0)), 201_553);
        assert_eq!(week_of(at(2016, 1, 4, 0, 0)), 201_601);
        assert_eq!(week_of(at(2018, 12, 31, 0, 0)), 201_901);
        // AddDate normalises: 2015-03-31 minus 1 month is "2015-02-31", i.e. 2015-03-03.
        let w = Within {
            months: 1,
            ..Within::default()
        };
        assert_eq!(
            minus(at(2015, 3, 31, 10, 0), w),
            i128::from(at(2015, 3, 3, 10, 0))
        );
        let w = Within::parse("1y5m7d2h").expect("valid");
        assert_eq!(
            minus(at(2016, 8, 18, 12, 0), w),
            i128::from(at(2015, 3, 11, 10, 0))
        );
    }

    #[test]
    fn durations_parse_or_say_why_not() {
        assert_eq!(
            Within::parse("1y5m7d2h"),
            Ok(Within {
                years: 1,
                months: 5,
                days: 7,
                hours: 2
            })
        );
        assert_eq!(Within::parse("2h3d").map(|w| (w.days, w.hours)), Ok((3, 2)));
        for bad in ["", "5", "d", "1w", "1d1d", "-1d", "1.5d", "99999999999d"] {
            let e = Within::parse(bad).expect_err(bad);
            assert!(
                e.contains(&format!("'{bad}'")) && e.contains("1y5m7d2h"),
                "{e}"
            );
        }
        assert_eq!(
            Within::parse("1y5m7d2h").map(|w| w.to_string()),
            Ok("1y5m7d2h".into())
        );
    }
}
