//! The few Redis (RESP2) messages a global zone exchanges, read under limits: a reply larger,
//! longer or deeper than a sync can need is an error as soon as its header says so, before
//! anything is read or allocated for it.

/// A reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Simple(Vec<u8>),
    /// `-ERR ...`
    Error(Vec<u8>),
    /// `:42`
    Int(i64),
    /// `$3 abc`; `None` for `$-1`.
    Bulk(Option<Vec<u8>>),
    /// `*2 ...`; `None` for `*-1`.
    Array(Option<Vec<Value>>),
}

/// How much of a reply is accepted.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of one bulk string.
    pub max_bulk: usize,
    /// Elements of one array.
    pub max_items: usize,
    /// Arrays within arrays.
    pub max_depth: usize,
}

/// Why a reply was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RespError {
    /// Not RESP.
    Malformed,
    /// Over one of the [`Limits`].
    TooLarge,
}

impl std::fmt::Display for RespError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RespError::Malformed => "malformed reply",
            RespError::TooLarge => "reply over the limits",
        })
    }
}

/// Appends a command (an array of bulk strings) to `out`.
pub fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// The first reply in `buf` and the bytes it takes; `Ok(None)` if more bytes are needed.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(Value, usize)>, RespError> {
    parse_at(buf, 0, limits, 0)
}

/// A line from `at` to its CRLF, of at most `max` bytes: the line and where the next one
/// starts.
fn line(buf: &[u8], at: usize, max: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let rest = buf.get(at..).unwrap_or(&[]);
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(n) if n > max => Err(RespError::TooLarge),
        Some(n) => Ok(Some((&rest[..n], at + n + 2))),
        None if rest.len() > max + 1 => Err(RespError::TooLarge),
        None => Ok(None),
    }
}

fn number(text: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(RespError::Malformed)
}

fn parse_at(
    buf: &[u8],
    at: usize,
    limits: &Limits,
    depth: usize,
) -> Result<Option<(Value, usize)>, RespError> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    // A number (`:`, `$`, `*`) fits in 20 characters; a status or error line in `max_bulk`.
    let max = match kind {
        b'+' | b'-' => limits.max_bulk,
        b':' | b'$' | b'*' => 20,
        _ => return Err(RespError::Malformed),
    };
    let Some((text, next)) = line(buf, at + 1, max)? else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' => {
            let v = text.to_vec();
            Ok(Some((
                if kind == b'+' {
                    Value::Simple(v)
                } else {
                    Value::Error(v)
                },
                next,
            )))
        }
        b':' => Ok(Some((Value::Int(number(text)?), next))),
        b'$' => {
            let n = number(text)?;
            if n == -1 {
                return Ok(Some((Value::Bulk(None), next)));
            }
            let n = usize::try_from(n).map_err(|_| RespError::Malformed)?;
            if n > limits.max_bulk {
                return Err(RespError::TooLarge);
            }
            let end = next + n;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::Malformed);
            }
            Ok(Some((Value::Bulk(Some(buf[next..end].to_vec())), end + 2)))
        }
        b'*' => {
            let n = number(text)?;
            if n == -1 {
                return Ok(Some((Value::Array(None), next)));
            }
            let n = usize::try_from(n).map_err(|_| RespError::Malformed)?;
            if n > limits.max_items || depth >= limits.max_depth {
                return Err(RespError::TooLarge);
            }
            let mut items = Vec::with_capacity(n);
            let mut at = next;
            for _ in 0..n {
                match parse_at(buf, at, limits, depth + 1)? {
                    Some((v, next)) => {
                        items.push(v);
                        at = next;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Value::Array(Some(items)), at)))
        }
        _ => Err(RespError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_bulk: 64,
        max_items: 4,
        max_depth: 2,
    };

    #[test]
    fn replies() {
        assert_eq!(
            parse(b"+PONG\r\n", &L),
            Ok(Some((Value::Simple(b"PONG".to_vec()), 7)))
        );
        assert_eq!(parse(b":-12\r\nx", &L), Ok(Some((Value::Int(-12), 6))));
        assert_eq!(
            parse(b"$3\r\nabc\r\n", &L),
            Ok(Some((Value::Bulk(Some(b"abc".to_vec())), 9)))
        );
        assert_eq!(parse(b"$-1\r\n", &L), Ok(Some((Value::Bulk(None), 5))));
        let arr = b"*2\r\n:1\r\n:2\r\n";
        assert_eq!(
            parse(arr, &L),
            Ok(Some((
                Value::Array(Some(vec![Value::Int(1), Value::Int(2)])),
                arr.len()
            )))
        );
        assert_eq!(
            parse(b"-NOSCRIPT x\r\n", &L).unwrap().unwrap().0,
            Value::Error(b"NOSCRIPT x".to_vec())
        );
    }

    #[test]
    fn partial_replies_wait_for_more() {
        for cut in [0, 1, 3, 5, 8, 10] {
            assert_eq!(parse(&b"*2\r\n:1\r\n:2\r\n"[..cut], &L), Ok(None), "{cut}");
        }
        assert_eq!(parse(b"$3\r\nab", &L), Ok(None));
    }

    #[test]
    fn limits_refuse_before_reading() {
        assert_eq!(parse(b"$1000000000\r\n", &L), Err(RespError::TooLarge));
        assert_eq!(parse(b"*2000000000\r\n", &L), Err(RespError::TooLarge));
        assert_eq!(
            parse(b"*1\r\n*1\r\n*1\r\n:1\r\n", &L),
            Err(RespError::TooLarge)
        );
        assert_eq!(parse(&[b'+'; 100], &L), Err(RespError::TooLarge));
        assert_eq!(parse(&[b':'; 30], &L), Err(RespError::TooLarge));
        assert_eq!(parse(b"$-2\r\n", &L), Err(RespError::Malformed));
        assert_eq!(parse(b"?x\r\n", &L), Err(RespError::Malformed));
        assert_eq!(parse(b"$3\r\nabcd\r\n", &L), Err(RespError::Malformed));
    }

    #[test]
    fn commands() {
        let mut out = Vec::new();
        encode(&[b"PING"], &mut out);
        encode(&[b"SET", b"k", b""], &mut out);
        assert_eq!(
            out,
            b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
        );
    }
}
