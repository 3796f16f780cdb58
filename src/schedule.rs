//! The cron schedule: a standard 5-field expression in a time zone, the wall clock it is read
//! against, and the loop that fires it without overlap and without replaying missed runs.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The longest single sleep. The loop re-reads the wall clock at least this often, so a
/// clock step (NTP, a suspended host) moves the next run instead of leaving it stale.
const MAX_NAP: Duration = Duration::from_secs(60);

/// A parsed schedule. Times are computed in `tz` and handed out in UTC.
#[derive(Debug, Clone)]
pub struct Schedule {
    expr: String,
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses a 5-field cron expression (minute hour day-of-month month day-of-week; a
    /// seconds or year field is refused). `tz` is the `TZ` environment variable: unset,
    /// empty or `UTC` means UTC; otherwise an IANA zone name (with or without the POSIX
    /// leading `:`). The zone database is compiled in, so this works in an image that has
    /// no `/usr/share/zoneinfo`.
    pub fn parse(name: &str, expr: &str, tz: Option<&str>) -> Result<Schedule> {
        let fields = expr.split_whitespace().count();
        if fields != 5 {
            return Err(Error::config(format!(
                "{name}={expr:?}: expected 5 cron fields (minute hour day month weekday), got {fields}"
            )));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| Error::config(format!("{name}={expr:?}: {e}")))?;
        let tz = parse_tz(tz)?;
        let s = Schedule {
            expr: expr.trim().to_owned(),
            cron,
            tz,
        };
        // A pattern that can never match (e.g. `0 0 30 2 *`) is a configuration error.
        s.next_after(Utc::now())
            .ok_or_else(|| Error::config(format!("{name}={expr:?} never fires")))?;
        Ok(s)
    }

    pub fn expr(&self) -> &str {
        &self.expr
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|n| n.with_timezone(&Utc))
    }

    /// The schedule's interval, for the default maximum backup age: the longest gap between
    /// the next few fire times after `from` (a schedule like `0 2 * * 1-5` has a 3-day gap).
    pub fn interval(&self, from: DateTime<Utc>) -> Duration {
        let mut longest = TimeDelta::zero();
        let mut t = from;
        let Some(mut prev) = self.next_after(t) else {
            return Duration::ZERO;
        };
        for _ in 0..16 {
            t = prev;
            let Some(next) = self.next_after(t) else {
                break;
            };
            longest = longest.max(next - prev);
            prev = next;
        }
        longest.to_std().unwrap_or(Duration::ZERO)
    }
}

fn parse_tz(tz: Option<&str>) -> Result<Tz> {
    let name = tz.map(|s| s.trim().trim_start_matches(':')).unwrap_or("");
    if name.is_empty() || name.eq_ignore_ascii_case("utc") {
        return Ok(Tz::UTC);
    }
    name.parse::<Tz>().map_err(|_| {
        Error::config(format!(
            "TZ={name:?} is not a time zone name such as Europe/Berlin (unset it for UTC)"
        ))
    })
}

/// Where the scheduler reads the time. The process reads the system clock; tests read a
/// clock that follows tokio's paused time.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Runs `fire` at every fire time of `schedule` until `cancel`. Fire times that pass while
/// the process is down, or while the host is suspended, are not replayed: after each wake-up
/// the next fire time is computed from the current time, so at most one run follows a gap.
/// `fire` must not block: it starts a job or counts a skip.
pub async fn run(
    schedule: &Schedule,
    clock: &dyn Clock,
    cancel: &CancellationToken,
    mut fire: impl FnMut(DateTime<Utc>),
) {
    let Some(mut due) = schedule.next_after(clock.now()) else {
        return;
    };
    loop {
        let now = clock.now();
        if now >= due {
            fire(due);
            match schedule.next_after(now) {
                Some(n) => due = n,
                None => return,
            }
            continue;
        }
        let nap = (due - now).to_std().unwrap_or(Duration::ZERO).min(MAX_NAP);
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use chrono::TimeZone;

    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// A wall clock that advances with tokio's (paused) clock, and can be stepped.
    struct TestClock {
        base: DateTime<Utc>,
        start: tokio::time::Instant,
        step: Mutex<TimeDelta>,
    }

    impl TestClock {
        fn new(base: DateTime<Utc>) -> Self {
            TestClock {
                base,
                start: tokio::time::Instant::now(),
                step: Mutex::new(TimeDelta::zero()),
            }
        }
        fn jump(&self, d: TimeDelta) {
            *self.step.lock().unwrap() += d;
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> DateTime<Utc> {
            self.base
                + TimeDelta::from_std(self.start.elapsed()).unwrap()
                + *self.step.lock().unwrap()
        }
    }

    #[test]
    fn next_fire_time_in_utc_by_default() {
        let s = Schedule::parse("S", "0 2 * * *", None).unwrap();
        assert_eq!(
            s.next_after(at("2026-11-23T01:59:59Z")),
            Some(at("2026-11-23T02:00:00Z"))
        );
        // Strictly after: a run at 02:00:00 does not fire again at 02:00:00.
        assert_eq!(
            s.next_after(at("2026-11-23T02:00:00Z")),
            Some(at("2026-11-24T02:00:00Z"))
        );
        assert_eq!(
            s.interval(at("2026-11-23T00:00:00Z")),
            Duration::from_secs(86400)
        );
    }

    #[test]
    fn next_fire_time_follows_tz() {
        let s = Schedule::parse("S", "0 2 * * *", Some(":Europe/Berlin")).unwrap();
        // 02:00 in Berlin is 01:00 UTC in winter.
        assert_eq!(
            s.next_after(at("2026-11-23T00:00:00Z")),
            Some(at("2026-11-23T01:00:00Z"))
        );
        let utc = Schedule::parse("S", "0 2 * * *", Some("UTC")).unwrap();
        assert_eq!(utc.tz(), Tz::UTC);
    }

    #[test]
    fn weekday_schedules_report_their_longest_gap() {
        let s = Schedule::parse("S", "30 3 * * 1-5", None).unwrap();
        assert_eq!(
            s.interval(Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap()),
            Duration::from_secs(3 * 86400)
        );
    }

    #[test]
    fn bad_schedules_are_configuration_errors() {
        for bad in [
            "",
            "0 2 * *",
            "0 0 2 * * *",
            "61 * * * *",
            "0 2 * * * 2027",
            "nonsense",
        ] {
            let e = Schedule::parse("DBKEEPER_SCHEDULE", bad, None).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
            assert!(e.to_string().contains("DBKEEPER_SCHEDULE"), "{e}");
        }
        let e = Schedule::parse("S", "0 2 * * *", Some("Mars/Olympus")).unwrap_err();
        assert!(e.to_string().contains("TZ"), "{e}");
    }

    /// Fire times, as seen by `run`, over `hours` of paused time.
    async fn fired_over(
        expr: &str,
        clock: Arc<TestClock>,
        hours: u64,
        mut fire: impl FnMut(DateTime<Utc>) + Send + 'static,
        during: impl FnOnce(Arc<TestClock>) -> tokio::task::JoinHandle<()>,
    ) {
        let s = Schedule::parse("S", expr, None).unwrap();
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let clock2 = clock.clone();
        let driver = during(clock.clone());
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(hours * 3600)).await;
            c2.cancel();
        });
        run(&s, clock2.as_ref(), &cancel, &mut fire).await;
        stopper.await.unwrap();
        driver.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn fires_once_per_due_time() {
        let clock = Arc::new(TestClock::new(at("2026-11-23T00:30:00Z")));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        fired_over(
            "0 * * * *",
            clock,
            5,
            move |t| s2.lock().unwrap().push(t),
            |_| tokio::spawn(async {}),
        )
        .await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                at("2026-11-23T01:00:00Z"),
                at("2026-11-23T02:00:00Z"),
                at("2026-11-23T03:00:00Z"),
                at("2026-11-23T04:00:00Z"),
                at("2026-11-23T05:00:00Z"),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_clock_jump_over_many_fire_times_fires_once_not_in_a_burst() {
        let clock = Arc::new(TestClock::new(at("2026-11-23T00:30:00Z")));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        fired_over(
            "0 * * * *",
            clock,
            2,
            move |t| s2.lock().unwrap().push(t),
            |c| {
                tokio::spawn(async move {
                    // Ten minutes in, the host "wakes up" ten hours later.
                    tokio::time::sleep(Duration::from_secs(600)).await;
                    c.jump(TimeDelta::hours(10));
                })
            },
        )
        .await;
        let seen = seen.lock().unwrap().clone();
        // 01:00 was due when the clock jumped to 10:40: it fires once, late; then 11:00,
        // 12:00 — never 02:00..10:00.
        assert_eq!(
            seen,
            vec![
                at("2026-11-23T01:00:00Z"),
                at("2026-11-23T11:00:00Z"),
                at("2026-11-23T12:00:00Z"),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_does_not_replay_missed_runs() {
        // The process starts at 05:30 after being down since midnight: nothing fires until
        // 06:00.
        let clock = Arc::new(TestClock::new(at("2026-11-23T05:30:00Z")));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        fired_over(
            "0 * * * *",
            clock,
            1,
            move |t| s2.lock().unwrap().push(t),
            |_| tokio::spawn(async {}),
        )
        .await;
        assert_eq!(*seen.lock().unwrap(), vec![at("2026-11-23T06:00:00Z")]);
    }
}
