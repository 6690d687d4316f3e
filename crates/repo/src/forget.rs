//! `forget`: which snapshots a retention policy keeps, and removing the others.
//!
//! Forgetting deletes snapshot manifests only; the data they referenced stays until `prune`
//! (which takes the exclusive lock and decides what is still used). So forgetting is cheap, and
//! forgetting the parent of a backup that is running right now loses nothing: the running
//! backup's own snapshot references its chunks, and prune cannot run beside it.
//!
//! # Semantics (restic's, documented here so users can predict them)
//! - Snapshots are grouped by VM; every rule applies to each group on its own.
//! - Inside a group, snapshots are walked newest first (ties broken by id, so the outcome is
//!   deterministic). `keep_last N` keeps the N newest.
//! - `keep_hourly/daily/weekly/monthly/yearly N` keep, for each of the N most recent periods
//!   *that have at least one snapshot*, the newest snapshot of that period. Periods are calendar
//!   hours, days, ISO 8601 weeks (Monday to Sunday, the ISO week-numbering year), months and years
//!   in UTC. A period without snapshots does not use up the count, so `--keep-daily 7` keeps 7
//!   snapshots on 7 distinct days even when backups skipped a weekend.
//! - `keep_within D` keeps every snapshot whose time is at or after `reference - D`, where the
//!   reference is the group's newest snapshot time (restic's choice: a repository whose backups
//!   stopped does not lose its history just because the calendar moved on), capped at `now` so one
//!   snapshot with a clock far in the future cannot push every other snapshot out of the window.
//!   D is calendar-aware: `1y6m` subtracts one year and six months on the calendar (clamping to
//!   the month's last day), `d`/`w`/`h` are fixed 24 h / 7 days / 1 h.
//! - `keep_tags` keeps every snapshot carrying any of the listed tags (`KEY` or `KEY=VALUE`).
//! - The rules are unioned: a snapshot is kept when any rule keeps it, and its decision lists
//!   every rule that did.
//! - `tags` (a selection filter, not a keep rule) limits the whole operation to snapshots carrying
//!   all of the listed tags; other snapshots are not considered, not counted and never removed.
//! - A snapshot whose time cannot be read is always kept (reason says why): a damaged or foreign
//!   timestamp must never make us delete something.
//! - A policy with no rule at all is refused ("no policy given") instead of forgetting everything.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use chrono::{DateTime, Datelike, Days, Months, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

use crate::backend::ObjectKind;
use crate::repository::Repository;
use crate::snapshot::{self, Snapshot};
use crate::{Error, Result};

/// A retention policy. `None` (or an empty list) means the rule is not used; a count of
/// `u32::MAX` means "unlimited" (restic's `-1`), e.g. keep one snapshot per day, for all days.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepPolicy {
    pub last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
    pub within: Option<KeepDuration>,
    /// Keep every snapshot having any of these tags (`KEY` matches any value, `KEY=VALUE` exactly).
    pub keep_tags: Vec<String>,
    /// Selection filter: only snapshots having all of these tags are considered at all.
    pub tags: Vec<String>,
}

impl KeepPolicy {
    /// True when no keep rule is set (the filter `tags` is not a rule).
    pub fn is_empty(&self) -> bool {
        self.last.is_none()
            && self.hourly.is_none()
            && self.daily.is_none()
            && self.weekly.is_none()
            && self.monthly.is_none()
            && self.yearly.is_none()
            && self.within.is_none()
            && self.keep_tags.is_empty()
    }
}

impl fmt::Display for KeepPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (name, value) in [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ] {
            if let Some(n) = value {
                parts.push(format!("keep {n} {name}"));
            }
        }
        if let Some(d) = &self.within {
            parts.push(format!("keep within {d}"));
        }
        for t in &self.keep_tags {
            parts.push(format!("keep tag {t}"));
        }
        if parts.is_empty() {
            parts.push("no policy".into());
        }
        if !self.tags.is_empty() {
            parts.push(format!("only snapshots tagged {}", self.tags.join(",")));
        }
        f.write_str(&parts.join(", "))
    }
}

/// A calendar-aware duration for `keep_within`: `1y6m`, `7d`, `2w`, `12h`, `1y2m3w4d5h`.
/// `m` is months (as in restic); weeks are folded into days.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepDuration {
    pub years: u32,
    pub months: u32,
    pub days: u32,
    pub hours: u32,
}

impl KeepDuration {
    /// Parse `<number><unit>` groups, units `y` (years), `m` (months), `w` (weeks), `d` (days),
    /// `h` (hours), each at most once, e.g. `1y6m`, `2w`, `36h`.
    pub fn parse(text: &str) -> Result<KeepDuration> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "invalid duration {text:?}: {why} (expected numbers with units y, m (months), w, d, h, e.g. 7d, 2w, 1y6m, 12h)"
            ))
        };
        let text_trim = text.trim();
        if text_trim.is_empty() {
            return Err(bad("empty"));
        }
        let mut d = KeepDuration::default();
        let mut seen = String::new();
        let mut number: Option<u64> = None;
        for c in text_trim.chars() {
            if let Some(digit) = c.to_digit(10) {
                let n = number.unwrap_or(0) * 10 + u64::from(digit);
                if n > 1_000_000 {
                    return Err(bad("number too large"));
                }
                number = Some(n);
                continue;
            }
            let n = number
                .take()
                .ok_or_else(|| bad("a unit without a number"))? as u32;
            let unit = c.to_ascii_lowercase();
            if seen.contains(unit) {
                return Err(bad("a unit given twice"));
            }
            seen.push(unit);
            match unit {
                'y' => d.years = n,
                'm' => d.months = n,
                'w' => d.days = d.days.saturating_add(n.saturating_mul(7)),
                'd' => d.days = d.days.saturating_add(n),
                'h' => d.hours = n,
                _ => return Err(bad(&format!("unknown unit {c:?}"))),
            }
        }
        if number.is_some() {
            return Err(bad("a number without a unit"));
        }
        Ok(d)
    }

    /// `reference` minus this duration; `None` if it falls outside chrono's range (then every
    /// snapshot is within).
    fn subtract_from(&self, reference: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let months = self.years.checked_mul(12)?.checked_add(self.months)?;
        reference
            .checked_sub_months(Months::new(months))?
            .checked_sub_days(Days::new(u64::from(self.days)))?
            .checked_sub_signed(chrono::TimeDelta::try_hours(i64::from(self.hours))?)
    }
}

impl fmt::Display for KeepDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        for (n, u) in [
            (self.years, 'y'),
            (self.months, 'm'),
            (self.days, 'd'),
            (self.hours, 'h'),
        ] {
            if n > 0 {
                s.push_str(&format!("{n}{u}"));
            }
        }
        if s.is_empty() {
            s.push_str("0h");
        }
        f.write_str(&s)
    }
}

impl std::str::FromStr for KeepDuration {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        KeepDuration::parse(s)
    }
}

/// The outcome for one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub id: String,
    pub vm: String,
    pub time: String,
    pub keep: bool,
    /// Every rule that keeps it (`last`, `hourly`, `daily`, `weekly`, `monthly`, `yearly`,
    /// `within 7d`, `tag KEY`, `time unreadable`); empty when removed.
    pub reasons: Vec<String>,
}

/// What policy decisions are computed from: the parts of a snapshot that matter.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub vm: &'a str,
    pub time: &'a str,
    pub tags: &'a BTreeMap<String, String>,
}

/// Does a snapshot's tag map match `KEY` (any value) or `KEY=VALUE`?
pub fn tag_matches(tags: &BTreeMap<String, String>, spec: &str) -> bool {
    match spec.split_once('=') {
        Some((k, v)) => tags.get(k).is_some_and(|have| have == v),
        None => tags.contains_key(spec),
    }
}

/// Parse a snapshot time (RFC 3339, any offset) into UTC.
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Apply `policy` to `snapshots` (any order, any VMs) and decide for each selected snapshot.
/// Snapshots not matching the `tags` filter are not in the result. Output order: by VM, then
/// newest first. Errors only on an empty policy.
pub fn decide(
    snapshots: &[Candidate<'_>],
    policy: &KeepPolicy,
    now: SystemTime,
) -> Result<Vec<Decision>> {
    if policy.is_empty() {
        return Err(Error::InvalidArgument(
            "no policy given: refusing to forget every snapshot (give at least one of --keep-last, \
             --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly, \
             --keep-within, --keep-tag)"
                .into(),
        ));
    }
    let now: DateTime<Utc> = now.into();
    let mut groups: BTreeMap<&str, Vec<Timed<'_, '_>>> = BTreeMap::new();
    for s in snapshots {
        if !policy.tags.iter().all(|t| tag_matches(s.tags, t)) {
            continue;
        }
        groups
            .entry(s.vm)
            .or_default()
            .push((s, parse_time(s.time)));
    }
    let mut out = Vec::new();
    for (_, mut group) in groups {
        // Newest first; unreadable times last (they are kept regardless); ties by id.
        group.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.id.cmp(b.0.id)));
        out.extend(decide_group(&group, policy, now));
    }
    Ok(out)
}

/// A candidate with its parsed time (`None` when unreadable).
type Timed<'c, 'a> = (&'c Candidate<'a>, Option<DateTime<Utc>>);

/// A period key: snapshots with equal keys fall in the same hour/day/week/month/year.
type PeriodFn = fn(&DateTime<Utc>) -> (i32, u32, u32, u32);

fn decide_group(group: &[Timed<'_, '_>], policy: &KeepPolicy, now: DateTime<Utc>) -> Vec<Decision> {
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); group.len()];

    if let Some(n) = policy.last {
        // keep-last counts every snapshot, readable time or not (they sort last).
        for r in reasons.iter_mut().take(n as usize) {
            r.push("last".into());
        }
    }

    let buckets: [(&str, Option<u32>, PeriodFn); 5] = [
        ("hourly", policy.hourly, |t| {
            (t.year(), t.month(), t.day(), t.hour())
        }),
        ("daily", policy.daily, |t| (t.year(), t.month(), t.day(), 0)),
        ("weekly", policy.weekly, |t| {
            let w = t.iso_week();
            (w.year(), w.week(), 0, 0)
        }),
        ("monthly", policy.monthly, |t| (t.year(), t.month(), 0, 0)),
        ("yearly", policy.yearly, |t| (t.year(), 0, 0, 0)),
    ];
    for (name, count, period) in buckets {
        let Some(mut left) = count else { continue };
        let mut last_period = None;
        for (i, (_, time)) in group.iter().enumerate() {
            if left == 0 {
                break;
            }
            let Some(time) = time else { continue };
            let p = period(time);
            // Newest first, so the first snapshot seen in a period is that period's newest.
            if last_period != Some(p) {
                last_period = Some(p);
                reasons[i].push(name.to_string());
                left -= 1;
            }
        }
    }

    if let Some(within) = &policy.within {
        if let Some(newest) = group.iter().find_map(|(_, t)| *t) {
            let reference = newest.min(now);
            let threshold = within.subtract_from(reference);
            for (i, (_, time)) in group.iter().enumerate() {
                if let Some(time) = time {
                    if threshold.is_none_or(|th| *time >= th) {
                        reasons[i].push(format!("within {within}"));
                    }
                }
            }
        }
    }

    for spec in &policy.keep_tags {
        for (i, (s, _)) in group.iter().enumerate() {
            if tag_matches(s.tags, spec) {
                reasons[i].push(format!("tag {spec}"));
            }
        }
    }

    for (i, (_, time)) in group.iter().enumerate() {
        if time.is_none() {
            reasons[i].push("time unreadable".into());
        }
    }

    group
        .iter()
        .zip(reasons)
        .map(|((s, _), reasons)| Decision {
            id: s.id.to_string(),
            vm: s.vm.to_string(),
            time: s.time.to_string(),
            keep: !reasons.is_empty(),
            reasons,
        })
        .collect()
}

/// Apply `policy` to snapshots (as listed by [`snapshot::list_snapshots`]): one decision per
/// snapshot selected by the policy's `tags` filter, grouped by VM, newest first inside a group.
/// Errors only on an empty policy ("no policy given").
pub fn apply_policy(
    snapshots: &[(String, Snapshot)],
    policy: &KeepPolicy,
    now: SystemTime,
) -> Result<Vec<Decision>> {
    let candidates: Vec<Candidate<'_>> = snapshots
        .iter()
        .map(|(id, s)| Candidate {
            id,
            vm: &s.vm,
            time: &s.time,
            tags: &s.tags,
        })
        .collect();
    decide(&candidates, policy, now)
}

/// What `forget` decided and did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForgetReport {
    pub dry_run: bool,
    /// The policy in words.
    pub policy: String,
    /// One per considered snapshot: grouped by VM, newest first.
    pub decisions: Vec<Decision>,
    pub kept: usize,
    /// Snapshots removed (or that would be, with `dry_run`).
    pub removed: usize,
}

/// Apply `policy` to the repository's snapshots (only VM `vm` if given) and delete the manifests
/// of those it does not keep, unless `dry_run`. Data is freed later by `prune`.
///
/// Snapshot manifests that cannot be read are not listed by [`snapshot::list_snapshots`], so
/// they are never removed by a policy (remove them by id with [`forget_ids`]).
pub fn forget(
    repo: &Repository,
    policy: &KeepPolicy,
    dry_run: bool,
    vm: Option<&str>,
) -> Result<ForgetReport> {
    // A shared lock: forgetting beside a backup is safe (the data stays until prune), but it
    // must not interleave with a prune's bookkeeping, which holds the exclusive lock.
    let _lock = if dry_run {
        None
    } else {
        Some(crate::lock::acquire(repo, false, "forget")?)
    };
    let mut snaps = snapshot::list_snapshots(repo)?;
    if let Some(vm) = vm {
        snaps.retain(|(_, s)| s.vm == vm);
    }
    let decisions = apply_policy(&snaps, policy, SystemTime::now())?;
    if !dry_run {
        for d in decisions.iter().filter(|d| !d.keep) {
            repo.backend().delete(ObjectKind::Snapshot, &d.id)?;
        }
    }
    let removed = decisions.iter().filter(|d| !d.keep).count();
    Ok(ForgetReport {
        dry_run,
        policy: policy.to_string(),
        kept: decisions.len() - removed,
        removed,
        decisions,
    })
}

/// Remove snapshots by id (full or unique prefix, as `hyperkeep forget ID...`). Unlike
/// [`forget`] this also removes manifests that no longer open (damaged), which is how a user
/// gets rid of one after `check` reported it. Returns the full ids removed (or that would be).
pub fn forget_ids(repo: &Repository, specs: &[String], dry_run: bool) -> Result<Vec<String>> {
    let names: Vec<String> = repo
        .backend()
        .list(ObjectKind::Snapshot)?
        .into_iter()
        .map(|i| i.name)
        .collect();
    let mut ids = Vec::new();
    for spec in specs {
        let spec_l = spec.trim().to_ascii_lowercase();
        if spec_l.len() < snapshot::MIN_PREFIX || !spec_l.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidArgument(format!(
                "'{spec}' is not a snapshot id: give a full id or at least {} hex digits of one",
                snapshot::MIN_PREFIX
            )));
        }
        let matches: Vec<&String> = names.iter().filter(|n| n.starts_with(&spec_l)).collect();
        match matches.as_slice() {
            [one] => ids.push((*one).clone()),
            [] => {
                return Err(Error::NotFound(format!(
                    "no snapshot with id {spec_l}… in the repository (`hyperkeep snapshots` lists them)"
                )))
            }
            many => {
                return Err(Error::InvalidArgument(format!(
                    "snapshot id {spec_l}… is ambiguous: {} snapshots match; give more digits",
                    many.len()
                )))
            }
        }
    }
    ids.sort();
    ids.dedup();
    if !dry_run {
        let _lock = crate::lock::acquire(repo, false, "forget")?;
        for id in &ids {
            repo.backend().delete(ObjectKind::Snapshot, id)?;
        }
    }
    Ok(ids)
}

/// Seconds since the epoch as a UTC time (tests and callers that count in seconds).
pub fn utc_from_secs(secs: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_opt(secs, 0).single()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Snap {
        id: String,
        vm: String,
        time: String,
        tags: BTreeMap<String, String>,
    }

    fn t(s: &str) -> DateTime<Utc> {
        parse_time(s).unwrap()
    }

    fn snap(vm: &str, time: DateTime<Utc>) -> Snap {
        Snap {
            id: format!("{vm}-{}", time.format("%Y%m%dT%H%M%S")),
            vm: vm.into(),
            time: time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            tags: BTreeMap::new(),
        }
    }

    fn run(snaps: &[Snap], policy: &KeepPolicy, now: DateTime<Utc>) -> Vec<Decision> {
        let c: Vec<Candidate<'_>> = snaps
            .iter()
            .map(|s| Candidate {
                id: &s.id,
                vm: &s.vm,
                time: &s.time,
                tags: &s.tags,
            })
            .collect();
        decide(&c, policy, now.into()).unwrap()
    }

    fn kept(d: &[Decision]) -> Vec<String> {
        d.iter()
            .filter(|d| d.keep)
            .map(|d| d.time.clone())
            .collect()
    }

    /// 30 days of one snapshot at 02:00 each, plus on the last 3 days an hourly burst
    /// 08:00..=20:00.
    fn month_with_bursts() -> Vec<Snap> {
        let start = t("2026-10-01T02:00:00Z");
        let mut v = Vec::new();
        for day in 0..30u64 {
            let d = start.checked_add_days(Days::new(day)).unwrap();
            v.push(snap("vm1", d));
            if day >= 27 {
                for h in 6..=18 {
                    v.push(snap("vm1", d + chrono::TimeDelta::hours(h)));
                }
            }
        }
        v
    }

    #[test]
    fn empty_policy_is_refused() {
        let snaps = month_with_bursts();
        let c: Vec<Candidate<'_>> = snaps
            .iter()
            .map(|s| Candidate {
                id: &s.id,
                vm: &s.vm,
                time: &s.time,
                tags: &s.tags,
            })
            .collect();
        let err = decide(&c, &KeepPolicy::default(), SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("no policy given"), "{err}");
        // A selection filter alone is not a policy either.
        let p = KeepPolicy {
            tags: vec!["x".into()],
            ..Default::default()
        };
        assert!(decide(&c, &p, SystemTime::now()).is_err());
    }

    #[test]
    fn keep_daily_keeps_newest_per_day_for_distinct_days() {
        let snaps = month_with_bursts();
        let p = KeepPolicy {
            daily: Some(7),
            ..Default::default()
        };
        let d = run(&snaps, &p, t("2026-11-01T00:00:00Z"));
        assert_eq!(d.len(), snaps.len());
        assert_eq!(
            kept(&d),
            vec![
                "2026-10-30T20:00:00Z",
                "2026-10-29T20:00:00Z",
                "2026-10-28T20:00:00Z",
                "2026-10-27T02:00:00Z",
                "2026-10-26T02:00:00Z",
                "2026-10-25T02:00:00Z",
                "2026-10-24T02:00:00Z",
            ]
        );
        for k in d.iter().filter(|d| d.keep) {
            assert_eq!(k.reasons, vec!["daily"]);
        }
        for r in d.iter().filter(|d| !d.keep) {
            assert!(r.reasons.is_empty());
        }
    }

    #[test]
    fn skipped_days_do_not_use_up_the_count() {
        // Snapshots every other day: keep-daily 3 reaches back 6 days.
        let snaps: Vec<Snap> = (0..10u64)
            .map(|i| {
                snap(
                    "vm",
                    t("2026-01-01T12:00:00Z")
                        .checked_add_days(Days::new(2 * i))
                        .unwrap(),
                )
            })
            .collect();
        let p = KeepPolicy {
            daily: Some(3),
            ..Default::default()
        };
        let d = run(&snaps, &p, t("2027-01-01T00:00:00Z"));
        assert_eq!(
            kept(&d),
            vec![
                "2026-01-19T12:00:00Z",
                "2026-01-17T12:00:00Z",
                "2026-01-15T12:00:00Z"
            ]
        );
    }

    #[test]
    fn keep_last_and_hourly() {
        let snaps = month_with_bursts();
        let p = KeepPolicy {
            last: Some(2),
            hourly: Some(4),
            ..Default::default()
        };
        let d = run(&snaps, &p, t("2026-11-01T00:00:00Z"));
        let k: Vec<(String, Vec<String>)> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| (d.time.clone(), d.reasons.clone()))
            .collect();
        assert_eq!(
            k,
            vec![
                (
                    "2026-10-30T20:00:00Z".into(),
                    vec!["last".into(), "hourly".into()]
                ),
                (
                    "2026-10-30T19:00:00Z".into(),
                    vec!["last".into(), "hourly".into()]
                ),
                ("2026-10-30T18:00:00Z".into(), vec!["hourly".into()]),
                ("2026-10-30T17:00:00Z".into(), vec!["hourly".into()]),
            ]
        );
    }

    #[test]
    fn combined_daily_weekly_monthly_yearly() {
        // One snapshot a day at 03:00 for 400 days from 2025-01-01 (Wednesday).
        let start = t("2025-01-01T03:00:00Z");
        let snaps: Vec<Snap> = (0..400u64)
            .map(|i| snap("vm", start.checked_add_days(Days::new(i)).unwrap()))
            .collect();
        // Newest: 2026-02-04 (Wednesday, ISO week 6 of 2026).
        assert_eq!(snaps.last().unwrap().time, "2026-02-04T03:00:00Z");
        let p = KeepPolicy {
            daily: Some(3),
            weekly: Some(3),
            monthly: Some(3),
            yearly: Some(3),
            ..Default::default()
        };
        let d = run(&snaps, &p, t("2026-02-05T00:00:00Z"));
        let k: Vec<(String, Vec<String>)> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| (d.time[..10].to_string(), d.reasons.clone()))
            .collect();
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            k,
            vec![
                (
                    "2026-02-04".into(),
                    r(&["daily", "weekly", "monthly", "yearly"])
                ),
                ("2026-02-03".into(), r(&["daily"])),
                ("2026-02-02".into(), r(&["daily"])),
                // Sunday closing ISO week 5 and week 4.
                ("2026-02-01".into(), r(&["weekly"])),
                ("2026-01-31".into(), r(&["monthly"])),
                ("2026-01-25".into(), r(&["weekly"])),
                ("2025-12-31".into(), r(&["monthly", "yearly"])),
            ]
        );
    }

    #[test]
    fn iso_week_spans_the_new_year() {
        // 2024-12-30 (Mon) .. 2025-01-05 (Sun) are all ISO week 1 of 2025.
        let snaps: Vec<Snap> = [
            "2024-12-29T10:00:00Z", // Sunday, week 52 of 2024
            "2024-12-30T10:00:00Z",
            "2024-12-31T10:00:00Z",
            "2025-01-02T10:00:00Z",
        ]
        .iter()
        .map(|s| snap("vm", t(s)))
        .collect();
        let p = KeepPolicy {
            weekly: Some(5),
            ..Default::default()
        };
        let d = run(&snaps, &p, t("2025-06-01T00:00:00Z"));
        assert_eq!(
            kept(&d),
            vec!["2025-01-02T10:00:00Z", "2024-12-29T10:00:00Z"]
        );
    }

    #[test]
    fn within_is_relative_to_newest_and_calendar_aware() {
        let snaps: Vec<Snap> = [
            "2025-08-31T00:00:00Z",
            "2025-09-01T00:00:00Z",
            "2025-09-02T00:00:00Z",
            "2026-02-28T12:00:00Z",
            "2026-03-31T12:00:00Z",
        ]
        .iter()
        .map(|s| snap("vm", t(s)))
        .collect();
        // now is far later: keep-within is relative to the newest snapshot, not to now.
        let now = t("2030-01-01T00:00:00Z");
        let p = KeepPolicy {
            within: Some(KeepDuration::parse("7m").unwrap()),
            ..Default::default()
        };
        // 2026-03-31 12:00 minus 7 months = 2025-08-31 12:00: the 00:00 snapshot that day is out.
        let d = run(&snaps, &p, now);
        assert_eq!(
            kept(&d),
            vec![
                "2026-03-31T12:00:00Z",
                "2026-02-28T12:00:00Z",
                "2025-09-02T00:00:00Z",
                "2025-09-01T00:00:00Z"
            ]
        );
        assert_eq!(d[0].reasons, vec!["within 7m"]);
        // 1 month back from March 31 clamps to Feb 28: the Feb 28 12:00 snapshot is exactly on
        // the threshold and kept.
        let p = KeepPolicy {
            within: Some(KeepDuration::parse("1m").unwrap()),
            ..Default::default()
        };
        let d = run(&snaps, &p, now);
        assert_eq!(
            kept(&d),
            vec!["2026-03-31T12:00:00Z", "2026-02-28T12:00:00Z"]
        );
    }

    #[test]
    fn within_is_capped_at_now() {
        // One snapshot with a clock two years ahead must not push the others out.
        let snaps: Vec<Snap> = [
            "2026-11-20T00:00:00Z",
            "2026-11-24T00:00:00Z",
            "2028-11-24T00:00:00Z",
        ]
        .iter()
        .map(|s| snap("vm", t(s)))
        .collect();
        let p = KeepPolicy {
            within: Some(KeepDuration::parse("2d").unwrap()),
            ..Default::default()
        };
        let d = run(&snaps, &p, t("2026-11-25T00:00:00Z"));
        assert_eq!(
            kept(&d),
            vec!["2028-11-24T00:00:00Z", "2026-11-24T00:00:00Z"]
        );
    }

    #[test]
    fn groups_are_per_vm_and_tags_filter_and_keep() {
        let mut snaps = Vec::new();
        for (i, vm) in ["a", "b"].iter().enumerate() {
            for d in 0..5u64 {
                let mut s = snap(
                    vm,
                    t("2026-05-01T00:00:00Z")
                        .checked_add_days(Days::new(d))
                        .unwrap()
                        + chrono::TimeDelta::minutes(i as i64),
                );
                if d == 0 {
                    s.tags.insert("keep".into(), "forever".into());
                }
                if d % 2 == 0 {
                    s.tags.insert("kind".into(), "even".into());
                }
                snaps.push(s);
            }
        }
        let p = KeepPolicy {
            last: Some(1),
            keep_tags: vec!["keep=forever".into()],
            ..Default::default()
        };
        let d = run(&snaps, &p, t("2026-06-01T00:00:00Z"));
        assert_eq!(d.len(), 10);
        let k: Vec<(String, String, Vec<String>)> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| (d.vm.clone(), d.time[..10].to_string(), d.reasons.clone()))
            .collect();
        assert_eq!(
            k,
            vec![
                ("a".into(), "2026-05-05".into(), vec!["last".into()]),
                (
                    "a".into(),
                    "2026-05-01".into(),
                    vec!["tag keep=forever".into()]
                ),
                ("b".into(), "2026-05-05".into(), vec!["last".into()]),
                (
                    "b".into(),
                    "2026-05-01".into(),
                    vec!["tag keep=forever".into()]
                ),
            ]
        );
        // A wrong value does not match; a bare key matches any value.
        assert!(!tag_matches(&snaps[0].tags, "keep=never"));
        assert!(tag_matches(&snaps[0].tags, "keep"));

        // Selection filter: only "kind=even" snapshots are considered (3 per VM).
        let p = KeepPolicy {
            last: Some(1),
            tags: vec!["kind=even".into()],
            ..Default::default()
        };
        let d = run(&snaps, &p, t("2026-06-01T00:00:00Z"));
        assert_eq!(d.len(), 6);
        assert_eq!(d.iter().filter(|d| d.keep).count(), 2);
        assert!(d
            .iter()
            .all(|d| d.time[8..10] != *"02" && d.time[8..10] != *"04"));
    }

    #[test]
    fn unreadable_time_is_always_kept() {
        let mut snaps = vec![
            snap("vm", t("2026-01-01T00:00:00Z")),
            snap("vm", t("2026-01-02T00:00:00Z")),
        ];
        snaps.push(Snap {
            id: "zz".into(),
            vm: "vm".into(),
            time: "yesterday-ish".into(),
            tags: BTreeMap::new(),
        });
        let p = KeepPolicy {
            daily: Some(1),
            ..Default::default()
        };
        let d = run(&snaps, &p, t("2026-06-01T00:00:00Z"));
        let k: Vec<(String, Vec<String>)> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| (d.id.clone(), d.reasons.clone()))
            .collect();
        assert_eq!(
            k,
            vec![
                ("vm-20260102T000000".into(), vec!["daily".into()]),
                ("zz".into(), vec!["time unreadable".into()]),
            ]
        );
    }

    #[test]
    fn offsets_are_converted_to_utc() {
        // 23:30 at -02:00 is 01:30 UTC the next day: two distinct UTC days.
        let snaps = vec![
            Snap {
                id: "x".into(),
                vm: "vm".into(),
                time: "2026-03-01T23:30:00-02:00".into(),
                tags: BTreeMap::new(),
            },
            snap("vm", t("2026-03-01T20:00:00Z")),
        ];
        let p = KeepPolicy {
            daily: Some(5),
            ..Default::default()
        };
        let d = run(&snaps, &p, t("2026-06-01T00:00:00Z"));
        assert!(d.iter().all(|d| d.keep));
    }

    #[test]
    fn durations_parse() {
        let p = |s: &str| KeepDuration::parse(s).unwrap();
        assert_eq!(
            p("7d"),
            KeepDuration {
                days: 7,
                ..Default::default()
            }
        );
        assert_eq!(p("2w").days, 14);
        assert_eq!(
            p("1y6m"),
            KeepDuration {
                years: 1,
                months: 6,
                ..Default::default()
            }
        );
        assert_eq!(p("12h").hours, 12);
        assert_eq!(
            p("1y2m3w4d5h"),
            KeepDuration {
                years: 1,
                months: 2,
                days: 25,
                hours: 5
            }
        );
        assert_eq!(p("1y6m").to_string(), "1y6m");
        for bad in ["", "7", "d", "7x", "1d2d", "-1d", "99999999d", "1.5d"] {
            let e = KeepDuration::parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn policy_display() {
        let p = KeepPolicy {
            daily: Some(7),
            within: Some(KeepDuration::parse("2w").unwrap()),
            ..Default::default()
        };
        assert_eq!(p.to_string(), "keep 7 daily, keep within 14d");
    }
}
