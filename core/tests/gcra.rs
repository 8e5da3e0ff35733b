//! Rates, GCRA (nginx `limit_req ... burst=B nodelay` semantics) and the
//! RateLimit headers.

use mesh_core::gcra::{
    parse_rate, policy_header, ratelimit_header, retry_after_secs, Gcra, Outcome, Rate,
};

const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;
/// An arbitrary "now" far from 0.
const T0: u64 = 1_700_000_000 * SEC;

fn gcra(rate: &str, burst: u64) -> Gcra {
    Gcra::new(parse_rate(rate).unwrap(), burst)
}

/// Apply a check the way the rate table does.
fn hit(g: &Gcra, tat: &mut u64, now: u64) -> Outcome {
    let o = g.check(*tat, now);
    *tat = o.new_tat;
    o
}

#[test]
fn rates() {
    assert_eq!(
        parse_rate("10r/s").unwrap(),
        Rate {
            per: 10,
            period_us: SEC
        }
    );
    assert_eq!(
        parse_rate("1r/s").unwrap(),
        Rate {
            per: 1,
            period_us: SEC
        }
    );
    assert_eq!(
        parse_rate("5r/m").unwrap(),
        Rate {
            per: 5,
            period_us: 60 * SEC
        }
    );
    assert_eq!(parse_rate("007r/s").unwrap().per, 7);
    assert_eq!(parse_rate("18446744073709551615r/s").unwrap().per, u64::MAX);
    for (bad, why) in [
        ("0r/s", "at least 1"),
        ("00r/m", "at least 1"),
        ("10", "missing unit"),
        ("10r", "r/s or r/m"),
        ("10r/h", "r/s or r/m"),
        ("10r/ms", "r/s or r/m"),
        ("10R/S", "r/s or r/m"),
        ("10r/s ", "r/s or r/m"),
        ("1.5r/s", "r/s or r/m"),
        ("r/s", "expected a number"),
        ("", "expected a number"),
        (" 10r/s", "expected a number"),
        ("-1r/s", "expected a number"),
        ("+1r/s", "expected a number"),
        ("18446744073709551616r/s", "too large"),
        ("99999999999999999999999r/m", "too large"),
    ] {
        let e = parse_rate(bad).unwrap_err();
        assert!(e.contains(why), "{bad:?}: {e}");
        assert!(e.starts_with("invalid rate "), "{e}");
    }
    assert_eq!(parse_rate("10r/s").unwrap().to_string(), "10r/s");
    assert_eq!(parse_rate("5r/m").unwrap().to_string(), "5r/m");
}

#[test]
fn construction() {
    let g = gcra("10r/s", 5);
    assert_eq!(g.interval_us, 100 * MS);
    assert_eq!(g.tolerance_us, 500 * MS);
    assert_eq!(g.burst, 5);
    assert_eq!(g.quota(), 6);
    assert_eq!(gcra("5r/m", 0).interval_us, 12 * SEC);
    assert_eq!(gcra("3r/s", 0).interval_us, 333_333);
    // Faster than one per microsecond: one per microsecond.
    assert_eq!(gcra("2000000r/s", 0).interval_us, 1);
    let g = gcra("18446744073709551615r/s", u64::MAX);
    assert_eq!(g.interval_us, 1);
    assert_eq!(g.tolerance_us, u64::MAX);
    // A rate built by hand with per = 0 does not divide by zero.
    let g = Gcra::new(
        Rate {
            per: 0,
            period_us: SEC,
        },
        1,
    );
    assert_eq!(g.interval_us, SEC);
}

#[test]
fn burst_then_sustained() {
    let g = gcra("10r/s", 5);
    let mut tat = 0;
    // B+1 = 6 at the same instant from no state.
    for i in 0..6 {
        let o = hit(&g, &mut tat, T0);
        assert!(o.allowed, "request {i}");
        assert_eq!(o.remaining, 5 - i);
        assert_eq!(o.retry_after_us, 0);
        assert_eq!(o.reset_us, (i + 1) * 100 * MS);
        assert_eq!(o.next_us, 100 * MS);
    }
    assert_eq!(tat, T0 + 600 * MS);
    // The 7th is refused, for about 100 ms, and changes nothing.
    let o = hit(&g, &mut tat, T0);
    assert!(!o.allowed);
    assert_eq!(o.remaining, 0);
    assert_eq!(o.retry_after_us, 100 * MS);
    assert_eq!(o.next_us, 100 * MS);
    assert_eq!(o.reset_us, 600 * MS);
    assert_eq!(o.new_tat, T0 + 600 * MS);
    assert_eq!(tat, T0 + 600 * MS);
    // Just before: still refused, 1 µs to go.
    let o = hit(&g, &mut tat, T0 + 100 * MS - 1);
    assert!(!o.allowed);
    assert_eq!(o.retry_after_us, 1);
    // Then exactly one more per 100 ms.
    for k in 1..=20 {
        let now = T0 + k * 100 * MS;
        let o = hit(&g, &mut tat, now);
        assert!(o.allowed, "tick {k}");
        assert_eq!(o.remaining, 0);
        let o = hit(&g, &mut tat, now);
        assert!(!o.allowed, "tick {k} second");
        assert_eq!(o.retry_after_us, 100 * MS);
    }
    // Half-way between ticks: refused, 50 ms to wait.
    let o = hit(&g, &mut tat, T0 + 2050 * MS);
    assert!(!o.allowed);
    assert_eq!(o.retry_after_us, 50 * MS);

    // After a long idle, a full burst again.
    let later = T0 + 3600 * SEC;
    let allowed = (0..10).filter(|_| hit(&g, &mut tat, later).allowed).count();
    assert_eq!(allowed, 6);
}

#[test]
fn partial_refill() {
    let g = gcra("10r/s", 5);
    let mut tat = 0;
    for _ in 0..6 {
        assert!(hit(&g, &mut tat, T0).allowed);
    }
    // 250 ms later: 2 requests back (and 50 ms toward the third).
    let now = T0 + 250 * MS;
    let o = g.check(tat, now);
    assert!(o.allowed);
    assert_eq!(o.remaining, 1);
    assert_eq!(o.next_us, 50 * MS);
    let allowed = (0..5).filter(|_| hit(&g, &mut tat, now).allowed).count();
    assert_eq!(allowed, 2);
}

#[test]
fn burst_zero() {
    let g = gcra("10r/s", 0);
    let mut tat = 0;
    let o = hit(&g, &mut tat, T0);
    assert!(o.allowed);
    assert_eq!(o.remaining, 0);
    assert_eq!(o.reset_us, 100 * MS);
    let o = hit(&g, &mut tat, T0 + 99_999);
    assert!(!o.allowed);
    assert_eq!(o.retry_after_us, 1);
    assert_eq!(retry_after_secs(&o), 1);
    assert!(hit(&g, &mut tat, T0 + 100 * MS).allowed);
    assert!(!hit(&g, &mut tat, T0 + 100 * MS).allowed);
    // Requests spaced exactly at the rate all pass.
    for k in 2..100 {
        assert!(hit(&g, &mut tat, T0 + k * 100 * MS).allowed);
    }
}

#[test]
fn per_minute() {
    let g = gcra("5r/m", 2);
    let mut tat = 0;
    for _ in 0..3 {
        assert!(hit(&g, &mut tat, T0).allowed);
    }
    let o = hit(&g, &mut tat, T0);
    assert!(!o.allowed);
    assert_eq!(o.retry_after_us, 12 * SEC);
    assert_eq!(retry_after_secs(&o), 12);
    assert!(!hit(&g, &mut tat, T0 + 11 * SEC).allowed);
    assert!(hit(&g, &mut tat, T0 + 12 * SEC).allowed);
    // A minute of steady 5r/m: 5 allowed.
    let start = T0 + 60 * SEC;
    let mut tat = 0;
    let allowed = (0..60)
        .filter(|s| {
            let o = hit(&gcra("5r/m", 0), &mut tat, start + s * SEC);
            o.allowed
        })
        .count();
    assert_eq!(allowed, 5);
}

#[test]
fn clock_backwards() {
    let g = gcra("10r/s", 5);
    let mut tat = 0;
    for _ in 0..6 {
        assert!(hit(&g, &mut tat, T0).allowed);
    }
    // The clock steps back an hour: refused for at most one interval, not an hour.
    let back = T0 - 3600 * SEC;
    let o = hit(&g, &mut tat, back);
    assert!(!o.allowed);
    assert_eq!(o.retry_after_us, 100 * MS);
    assert!(o.new_tat <= T0 + 600 * MS);
    assert!(hit(&g, &mut tat, back + 100 * MS).allowed);
    // A small step back: the key just owes that much more.
    let mut tat = 0;
    assert!(hit(&g, &mut tat, T0).allowed);
    let o = hit(&g, &mut tat, T0 - 50 * MS);
    assert!(o.allowed);
    assert_eq!(o.remaining, 3);
    // Extremes.
    for (tat, now) in [
        (u64::MAX, 0),
        (u64::MAX, 1),
        (u64::MAX, u64::MAX),
        (0, u64::MAX),
        (1, 0),
        (0, 0),
    ] {
        let o = g.check(tat, now);
        assert!(o.allowed || o.new_tat <= tat);
        let _ = ratelimit_header("x", &o);
        let _ = retry_after_secs(&o);
    }
    assert!(g.check(0, 0).allowed);
    assert!(!g.check(u64::MAX, 0).allowed);
    assert_eq!(g.check(u64::MAX, 0).retry_after_us, 100 * MS);
}

#[test]
fn huge_values() {
    let rates = [
        Rate {
            per: 1,
            period_us: u64::MAX,
        },
        Rate {
            per: u64::MAX,
            period_us: 1,
        },
        Rate {
            per: u64::MAX,
            period_us: u64::MAX,
        },
        Rate {
            per: 0,
            period_us: 0,
        },
        parse_rate("18446744073709551615r/m").unwrap(),
        parse_rate("1r/m").unwrap(),
    ];
    let bursts = [0, 1, 1_000_000, u64::MAX / 2, u64::MAX];
    let times = [0, 1, T0, u64::MAX / 2, u64::MAX - 1, u64::MAX];
    for rate in rates {
        for burst in bursts {
            let g = Gcra::new(rate, burst);
            assert!(g.interval_us >= 1);
            let _ = policy_header("p", &g);
            for &tat in &times {
                for &now in &times {
                    let o = g.check(tat, now);
                    if o.allowed {
                        assert_eq!(o.retry_after_us, 0);
                    } else {
                        assert!(o.retry_after_us > 0);
                        assert_eq!(o.remaining, 0);
                    }
                    let _ = ratelimit_header("p", &o);
                    assert!(retry_after_secs(&o) >= 1);
                }
            }
        }
    }
    // A hand-made Gcra with a zero interval does not divide by zero.
    let g = Gcra {
        interval_us: 0,
        tolerance_us: 0,
        burst: 0,
        rate: Rate {
            per: 1,
            period_us: 1,
        },
    };
    assert!(g.check(0, 5).allowed);
    let _ = policy_header("p", &g);
}

#[test]
fn headers() {
    let g = gcra("10r/s", 5);
    assert_eq!(policy_header("callers", &g), "\"callers\";q=6;w=1");
    assert_eq!(
        policy_header("callers", &gcra("50r/s", 100)),
        "\"callers\";q=101;w=3"
    );
    assert_eq!(policy_header("slow", &gcra("5r/m", 0)), "\"slow\";q=1;w=12");
    assert_eq!(policy_header("slow", &gcra("5r/m", 2)), "\"slow\";q=3;w=36");
    assert_eq!(
        policy_header("fast", &gcra("1000r/s", 0)),
        "\"fast\";q=1;w=1"
    );
    // Quoting: the name is a Structured Field String.
    assert_eq!(policy_header("a\"b\\", &g), "\"a\\\"b\\\\\";q=6;w=1");
    assert_eq!(policy_header("zone\u{e9}\r\n", &g), "\"zone___\";q=6;w=1");
    // Integers stay within 15 digits.
    assert_eq!(
        policy_header(
            "x",
            &Gcra::new(
                Rate {
                    per: 1,
                    period_us: u64::MAX
                },
                u64::MAX
            )
        ),
        "\"x\";q=999999999999999;w=999999999999999"
    );

    let mut tat = 0;
    let o = hit(&g, &mut tat, T0);
    assert_eq!(ratelimit_header("callers", &o), "\"callers\";r=5;t=1");
    for _ in 0..5 {
        hit(&g, &mut tat, T0);
    }
    let o = hit(&g, &mut tat, T0);
    assert!(!o.allowed);
    assert_eq!(ratelimit_header("callers", &o), "\"callers\";r=0;t=1");
    assert_eq!(retry_after_secs(&o), 1);

    let slow = gcra("5r/m", 0);
    let mut tat = 0;
    let o = hit(&slow, &mut tat, T0);
    assert_eq!(ratelimit_header("slow", &o), "\"slow\";r=0;t=12");
    let o = hit(&slow, &mut tat, T0 + 2 * SEC + 1);
    assert!(!o.allowed);
    assert_eq!(o.retry_after_us, 10 * SEC - 1);
    // Retry-After is never before the end of the effective window.
    assert_eq!(ratelimit_header("slow", &o), "\"slow\";r=0;t=10");
    assert_eq!(retry_after_secs(&o), 10);

    let refused = Outcome {
        allowed: false,
        new_tat: 0,
        remaining: 0,
        reset_us: 0,
        retry_after_us: 0,
        next_us: 0,
    };
    assert_eq!(retry_after_secs(&refused), 1);
    assert_eq!(
        retry_after_secs(&Outcome {
            retry_after_us: 1_500_000,
            ..refused
        }),
        2
    );
}
