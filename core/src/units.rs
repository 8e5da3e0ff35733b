//! nginx configuration value syntax, for directive parsing.

/// nginx's `NGX_MAX_INT_T_VALUE` on 64-bit platforms.
const MAX_INT: u64 = i64::MAX as u64;

/// A time in seconds, as nginx's `ngx_parse_time(line, 1)`:
/// digits with the units `y` (365 days), `M` (30 days), `w`, `d`, `h`, `m`,
/// `s`, in this order, each at most once, optionally separated by spaces; a
/// trailing number without a unit is seconds (`1h30` = 3630 seconds). `ms` is not
/// valid for seconds. Empty, signed, overflowing or unknown input is an error.
pub fn parse_time_secs(s: &str) -> Result<u64, String> {
    let err = || format!("invalid time \"{s}\"");
    // Steps, as in ngx_parse_time: a unit must come after every unit before it.
    const START: u8 = 0;
    const SEC: u8 = 7;
    const LAST: u8 = 9;

    let bytes = s.as_bytes();
    let mut step = START;
    let mut value: u64 = 0;
    let mut total: u64 = 0;
    let mut valid = false;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        i += 1;
        if c.is_ascii_digit() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(c - b'0')))
                .filter(|&v| v <= MAX_INT)
                .ok_or_else(err)?;
            valid = true;
            continue;
        }
        let (new_step, scale): (u8, u64) = match c {
            b'y' => (1, 365 * 24 * 3600),
            b'M' => (2, 30 * 24 * 3600),
            b'w' => (3, 7 * 24 * 3600),
            b'd' => (4, 24 * 3600),
            b'h' => (5, 3600),
            // "ms" (milliseconds) is not allowed where seconds are expected.
            b'm' if bytes.get(i) == Some(&b's') => return Err(err()),
            b'm' => (6, 60),
            b's' => (SEC, 1),
            // A bare number followed by a space: seconds, and nothing may follow.
            b' ' => (LAST, 1),
            _ => return Err(err()),
        };
        // Units in descending order, each once; ' ' only before 's'.
        let ok = if new_step == LAST {
            step < SEC
        } else {
            step < new_step
        };
        if !ok {
            return Err(err());
        }
        step = new_step;
        let part = value
            .checked_mul(scale)
            .filter(|&v| v <= MAX_INT)
            .ok_or_else(err)?;
        total = total
            .checked_add(part)
            .filter(|&v| v <= MAX_INT)
            .ok_or_else(err)?;
        value = 0;
        while bytes.get(i) == Some(&b' ') {
            i += 1;
        }
    }
    if !valid {
        return Err(err());
    }
    total
        .checked_add(value)
        .filter(|&v| v <= MAX_INT)
        .ok_or_else(err)
}

/// A size, as nginx's `ngx_parse_size` (plus `g`/`G` as `ngx_parse_offset`):
/// digits with an optional unit `k`/`K`, `m`/`M`, `g`/`G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let err = || format!("invalid size \"{s}\"");
    let (digits, scale): (&str, usize) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1 << 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(err)
}

/// `on`/`off`, compared case-insensitively as nginx's
/// `ngx_conf_set_flag_slot` does (`On`, `OFF` are accepted too).
pub fn parse_on_off(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("on") {
        Some(true)
    } else if s.eq_ignore_ascii_case("off") {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let ok = [
            ("0", 0),
            ("30", 30),
            ("30s", 30),
            ("5m", 300),
            ("1h", 3600),
            ("2d", 172_800),
            ("1w", 604_800),
            ("1M", 2_592_000),
            ("1y", 31_536_000),
            ("1h30m", 5400),
            ("1h 30m", 5400),
            ("1h30", 3630),
            (
                "1y1M1w1d1h1m1s",
                31_536_000 + 2_592_000 + 604_800 + 86_400 + 3661,
            ),
            ("9223372036854775807", i64::MAX as u64),
        ];
        for (s, want) in ok {
            assert_eq!(parse_time_secs(s), Ok(want), "{s}");
        }
        let bad = [
            "",
            " ",
            "s",
            "-1",
            "+1",
            "1.5",
            "1x",
            "500ms",
            "30m1h",
            "1s1s",
            "1m1m",
            "5 s",
            "9223372036854775808",
            "99999999999999999999",
            "300000000000y",
            "1S",
            "1H",
        ];
        for s in bad {
            assert!(parse_time_secs(s).is_err(), "{s}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("10k"), Ok(10 * 1024));
        assert_eq!(parse_size("10K"), Ok(10 * 1024));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("0"), Ok(0));
        for s in [
            "",
            "k",
            "-1",
            "+1",
            "1.5m",
            "10kb",
            "10 k",
            " 10",
            "1t",
            "99999999999999999999",
            "99999999999999g",
        ] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }

    #[test]
    fn flags() {
        assert_eq!(parse_on_off("on"), Some(true));
        assert_eq!(parse_on_off("off"), Some(false));
        assert_eq!(parse_on_off("On"), Some(true));
        assert_eq!(parse_on_off("OFF"), Some(false));
        assert_eq!(parse_on_off("yes"), None);
        assert_eq!(parse_on_off(""), None);
        assert_eq!(parse_on_off("on "), None);
    }
}
