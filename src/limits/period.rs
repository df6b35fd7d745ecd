//! Calendar periods for quotas: UTC days, and months either on the calendar
//! or anchored at a tenant's billing day (clamped to short months, so an
//! anchor on the 31st falls on Feb 28/29, Apr 30, …).

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};

/// A quota period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaPeriod {
    Day,
    /// Calendar month (`None`) or a month starting on a billing day (1..=31).
    Month {
        anchor_day: Option<u32>,
    },
}

/// The start (inclusive) and end (exclusive) of the period holding `now`.
pub fn bounds(period: QuotaPeriod, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    match period {
        QuotaPeriod::Day => {
            let start = midnight(now.date_naive());
            (start, start + Duration::days(1))
        }
        QuotaPeriod::Month { anchor_day } => {
            let anchor = anchor_day.unwrap_or(1).clamp(1, 31);
            let (y, m) = (now.year(), now.month());
            let this = anchored(y, m, anchor);
            if this <= now {
                let (ny, nm) = next_month(y, m);
                (this, anchored(ny, nm, anchor))
            } else {
                let (py, pm) = prev_month(y, m);
                (anchored(py, pm, anchor), this)
            }
        }
    }
}

/// The period before the one holding `now`.
pub fn previous(period: QuotaPeriod, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let (start, _) = bounds(period, now);
    bounds(period, start - Duration::seconds(1))
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

fn days_in_month(y: i32, m: u32) -> u32 {
    let (ny, nm) = next_month(y, m);
    let first_next = NaiveDate::from_ymd_opt(ny, nm, 1).expect("valid");
    (first_next - Duration::days(1)).day()
}

fn anchored(y: i32, m: u32, anchor: u32) -> DateTime<Utc> {
    let day = anchor.min(days_in_month(y, m));
    midnight(NaiveDate::from_ymd_opt(y, m, day).expect("clamped day is valid"))
}

fn next_month(y: i32, m: u32) -> (i32, u32) {
    if m == 12 {
        (y + 1, 1)
    } else {
        (y, m + 1)
    }
}

fn prev_month(y: i32, m: u32) -> (i32, u32) {
    if m == 1 {
        (y - 1, 12)
    } else {
        (y, m - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_utc_day_runs_midnight_to_midnight() {
        let (s, e) = bounds(QuotaPeriod::Day, at("2026-11-23T23:59:59Z"));
        assert_eq!(
            (s, e),
            (at("2026-11-23T00:00:00Z"), at("2026-11-24T00:00:00Z"))
        );
    }

    #[test]
    fn a_calendar_month_ends_at_the_first_of_the_next_even_at_year_end() {
        let (s, e) = bounds(
            QuotaPeriod::Month { anchor_day: None },
            at("2026-12-31T23:59:59Z"),
        );
        assert_eq!(
            (s, e),
            (at("2026-12-01T00:00:00Z"), at("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn february_of_a_leap_year_has_29_days() {
        let (s, e) = bounds(
            QuotaPeriod::Month { anchor_day: None },
            at("2028-02-29T12:00:00Z"),
        );
        assert_eq!(
            (s, e),
            (at("2028-02-01T00:00:00Z"), at("2028-03-01T00:00:00Z"))
        );
        let (s, _) = bounds(QuotaPeriod::Day, at("2028-02-29T12:00:00Z"));
        assert_eq!(s, at("2028-02-29T00:00:00Z"));
    }

    #[test]
    fn a_billing_anchor_on_the_31st_clamps_to_short_months() {
        let month = QuotaPeriod::Month {
            anchor_day: Some(31),
        };
        // Feb 2027 has 28 days: the period runs Jan 31 → Feb 28 → Mar 31.
        assert_eq!(
            bounds(month, at("2027-02-15T00:00:00Z")),
            (at("2027-01-31T00:00:00Z"), at("2027-02-28T00:00:00Z"))
        );
        assert_eq!(
            bounds(month, at("2027-02-28T00:00:00Z")),
            (at("2027-02-28T00:00:00Z"), at("2027-03-31T00:00:00Z"))
        );
        // Leap year: Feb 29.
        assert_eq!(
            bounds(month, at("2028-03-01T00:00:00Z")),
            (at("2028-02-29T00:00:00Z"), at("2028-03-31T00:00:00Z"))
        );
        assert_eq!(
            bounds(month, at("2027-04-30T10:00:00Z")),
            (at("2027-04-30T00:00:00Z"), at("2027-05-31T00:00:00Z"))
        );
    }

    #[test]
    fn a_billing_anchor_before_today_starts_this_month() {
        let month = QuotaPeriod::Month {
            anchor_day: Some(15),
        };
        assert_eq!(
            bounds(month, at("2026-11-23T00:00:00Z")),
            (at("2026-11-15T00:00:00Z"), at("2026-12-15T00:00:00Z"))
        );
        assert_eq!(
            bounds(month, at("2026-01-03T00:00:00Z")),
            (at("2025-12-15T00:00:00Z"), at("2026-01-15T00:00:00Z"))
        );
        assert_eq!(
            previous(month, at("2026-11-23T00:00:00Z")),
            (at("2026-10-15T00:00:00Z"), at("2026-11-15T00:00:00Z"))
        );
    }

    #[test]
    fn periods_always_contain_now() {
        let mut t = at("2024-01-01T00:00:00Z");
        let end = at("2029-01-01T00:00:00Z");
        while t < end {
            for p in [
                QuotaPeriod::Day,
                QuotaPeriod::Month { anchor_day: None },
                QuotaPeriod::Month {
                    anchor_day: Some(29),
                },
                QuotaPeriod::Month {
                    anchor_day: Some(31),
                },
            ] {
                let (s, e) = bounds(p, t);
                assert!(s <= t && t < e, "{p:?} {t}: {s}..{e}");
            }
            t += Duration::hours(13);
        }
    }
}
