//! The retention policy against the examples of restic's `forget` documentation
//! (doc/060_forget.rst, "Removing snapshots according to a policy"), on fixed time lists.

use pagesnap_engine::retention::{apply, Policy, Reason, Within};
use pagesnap_store::SnapshotId;

const DAY: u64 = 86_400_000;
const HOUR: u64 = 3_600_000;

/// Days since 1970-01-01 of a date.
fn days(y: i64, m: i64, d: i64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    u64::try_from(era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468)
        .expect("after 1970")
}

fn at(y: i64, m: i64, d: i64, h: u64) -> u64 {
    days(y, m, d) * DAY + h * HOUR
}

fn kept(policy: &Policy, times: &[u64]) -> Vec<u64> {
    let list: Vec<_> = times
        .iter()
        .enumerate()
        .map(|(i, t)| (SnapshotId(i as u64 + 1), *t))
        .collect();
    let mut ids: Vec<u64> = apply(policy, &list)
        .into_iter()
        .filter(|d| d.keep())
        .map(|d| d.id.0)
        .collect();
    ids.sort();
    ids
}

#[test]
fn the_documented_rules_table() {
    // Snapshots (ids 1..): two a day on 2016-01-01..03 (10:00 and 18:00), none on 01-04, one on
    // 01-05 (09:00), and one on 2016-01-18 (a later week).
    let times = [
        at(2016, 1, 1, 10),
        at(2016, 1, 1, 18),
        at(2016, 1, 2, 10),
        at(2016, 1, 2, 18),
        at(2016, 1, 3, 10),
        at(2016, 1, 3, 18),
        at(2016, 1, 5, 9),
        at(2016, 1, 18, 9),
    ];
    let p = |f: fn(&mut Policy)| {
        let mut p = Policy::default();
        f(&mut p);
        p
    };
    let table: Vec<(&str, Policy, Vec<u64>)> = vec![
        // "--keep-last n never delete the n last (most recent) snapshots"
        ("last 3", p(|p| p.last = 3), vec![6, 7, 8]),
        // "--keep-daily n for the last n days which have one or more snapshots, only keep the
        // last one for that day": days without snapshots (01-04, 01-06..17) do not count.
        ("daily 3", p(|p| p.daily = 3), vec![6, 7, 8]),
        ("daily 5", p(|p| p.daily = 5), vec![2, 4, 6, 7, 8]),
        // ISO weeks: 01-01..03 are 2015-W53, 01-05 is 2016-W01, 01-18 2016-W03.
        ("weekly 2", p(|p| p.weekly = 2), vec![7, 8]),
        ("weekly 3", p(|p| p.weekly = 3), vec![6, 7, 8]),
        // restic 0.17+: a rule with counts left also keeps the oldest snapshot.
        ("monthly 5", p(|p| p.monthly = 5), vec![1, 8]),
        ("yearly 1", p(|p| p.yearly = 1), vec![8]),
        ("hourly 3", p(|p| p.hourly = 3), vec![6, 7, 8]),
        // Rules combine with "or": each keeps what it keeps on its own.
        (
            "last 1 + daily 3",
            p(|p| {
                p.last = 1;
                p.daily = 3
            }),
            vec![6, 7, 8],
        ),
        (
            "last 2 + weekly 3",
            p(|p| {
                p.last = 2;
                p.weekly = 3
            }),
            vec![6, 7, 8],
        ),
        // "--keep-within duration keep all snapshots having a timestamp within the specified
        // duration of the latest snapshot": 13 days before 01-18 09:00 is 01-05 09:00, which is
        // not strictly newer.
        (
            "within 13d",
            p(|p| p.within = Within::parse("13d").ok()),
            vec![8],
        ),
        (
            "within 13d1h",
            p(|p| p.within = Within::parse("13d1h").ok()),
            vec![7, 8],
        ),
        (
            "within 1m",
            p(|p| p.within = Within::parse("1m").ok()),
            vec![1, 2, 3, 4, 5, 6, 7, 8],
        ),
    ];
    for (what, policy, want) in table {
        assert_eq!(kept(&policy, &times), want, "{what}");
    }
}

#[test]
fn reasons_name_every_rule_that_keeps() {
    let times = [at(2016, 1, 1, 10), at(2016, 1, 2, 10), at(2016, 1, 2, 11)];
    let list: Vec<_> = times
        .iter()
        .enumerate()
        .map(|(i, t)| (SnapshotId(i as u64 + 1), *t))
        .collect();
    let policy = Policy {
        last: 1,
        daily: 2,
        ..Policy::default()
    };
    let d = apply(&policy, &list);
    // Newest first.
    assert_eq!(d.iter().map(|d| d.id.0).collect::<Vec<_>>(), vec![3, 2, 1]);
    assert_eq!(d[0].reasons, vec![Reason::Last, Reason::Daily]);
    assert!(
        d[1].reasons.is_empty(),
        "same day as 3, and last 1 is used up"
    );
    assert_eq!(d[2].reasons, vec![Reason::Daily]);
}

/// "Suppose you make daily backups for 100 years. Then forget --keep-daily 7 --keep-weekly 5
/// --keep-monthly 12 --keep-yearly 75 will keep the most recent 7 daily snapshots, then 4
/// (remember, 7 dailies already include a week!) last-day-of-the-weeks and 11 or 12
/// last-day-of-the-months (11 or 12 depends if the 5 weeklies cross a month). And finally 75
/// last-day-of-the-year snapshots. All other snapshots are removed."
#[test]
fn a_hundred_years_of_daily_snapshots() {
    // Daily at 03:00 for 100 years up to Sunday 2075-06-09 (so the 7 dailies are one ISO week).
    let end = days(2075, 6, 9);
    assert_eq!((end + 3) % 7, 6, "a Sunday");
    let start = end - 36_500;
    let times: Vec<u64> = (start..=end).map(|d| d * DAY + 3 * HOUR).collect();
    let list: Vec<_> = times
        .iter()
        .enumerate()
        .map(|(i, t)| (SnapshotId(i as u64 + 1), *t))
        .collect();
    let policy = Policy {
        daily: 7,
        weekly: 5,
        monthly: 12,
        yearly: 75,
        ..Policy::default()
    };
    let decisions = apply(&policy, &list);
    let count = |r: Reason| decisions.iter().filter(|d| d.reasons.contains(&r)).count();
    assert_eq!(count(Reason::Daily), 7);
    assert_eq!(count(Reason::Weekly), 5);
    assert_eq!(count(Reason::Monthly), 12);
    assert_eq!(count(Reason::Yearly), 75);
    let only = |r: Reason| decisions.iter().filter(|d| d.reasons == vec![r]).count();
    // "then 4 last-day-of-the-weeks": every kept weekly is a Sunday.
    assert_eq!(only(Reason::Weekly), 4);
    for d in decisions
        .iter()
        .filter(|d| d.reasons.contains(&Reason::Weekly))
    {
        assert_eq!((d.time_unix_ms / DAY + 3) % 7, 6, "a Sunday");
    }
    // "11 last-day-of-the-months": the 5 weeklies (May 12 – June 9) hold no kept month end.
    let monthly_new = decisions
        .iter()
        .filter(|d| d.reasons.contains(&Reason::Monthly))
        .filter(|d| !d.reasons.contains(&Reason::Daily) && !d.reasons.contains(&Reason::Weekly))
        .count();
    assert_eq!(monthly_new, 11);
    // "75 last-day-of-the-year snapshots": 2075's newest, then Dec 31 of 2074 … 2001.
    let mut years: Vec<u64> = decisions
        .iter()
        .filter(|d| d.reasons.contains(&Reason::Yearly))
        .map(|d| d.time_unix_ms)
        .collect();
    years.sort();
    assert_eq!(years.len(), 75);
    assert_eq!(years[0], at(2001, 12, 31, 3));
    assert_eq!(years[73], at(2074, 12, 31, 3));
    // "All other snapshots are removed": 7 + 4 + 11 + 73 (the monthly window is July 2074 –
    // June 2075, so 2074-12-31 is kept by both monthly and yearly).
    let total = decisions.iter().filter(|d| d.keep()).count();
    assert_eq!(total, 7 + 4 + 11 + 73);
}

#[test]
fn an_empty_policy_is_empty() {
    assert!(Policy::default().is_empty());
    assert!(Policy {
        within: Within::parse("0d").ok(),
        ..Policy::default()
    }
    .is_empty());
    assert!(!Policy {
        monthly: 1,
        ..Policy::default()
    }
    .is_empty());
}

/// restic 0.17+: a period rule with counts left after the scan keeps the group's oldest snapshot
/// too, as `oldest daily`.
#[test]
fn a_rule_with_counts_left_keeps_the_oldest_snapshot_too() {
    let times = [
        at(2024, 3, 1, 8),
        at(2024, 3, 1, 20),
        at(2024, 3, 2, 8),
        at(2024, 3, 2, 20),
        at(2024, 3, 3, 8),
        at(2024, 3, 3, 20),
    ];
    let daily = Policy {
        daily: 7,
        ..Policy::default()
    };
    assert_eq!(kept(&daily, &times), vec![1, 2, 4, 6]);
    let list: Vec<_> = times
        .iter()
        .enumerate()
        .map(|(i, t)| (SnapshotId(i as u64 + 1), *t))
        .collect();
    let d = apply(&daily, &list);
    assert_eq!(d[5].id, SnapshotId(1));
    assert_eq!(d[5].reasons, vec![Reason::Oldest(&Reason::Daily)]);
    assert_eq!(d[5].reasons[0].to_string(), "oldest daily");
    // A rule whose counts ran out keeps no extra snapshot.
    let two = Policy {
        daily: 3,
        ..Policy::default()
    };
    assert_eq!(kept(&two, &times), vec![2, 4, 6]);
    // The oldest snapshot alone in its period is kept as the rule's own.
    // (ids renumbered from 1: the old 2, 4 and 6 are 1, 3 and 5)
    assert_eq!(kept(&daily, &times[1..]), vec![1, 3, 5]);
    let d = apply(&daily, &list[1..]);
    assert_eq!(d[4].reasons, vec![Reason::Daily]);
}
