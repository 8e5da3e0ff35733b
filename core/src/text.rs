//! Header values written straight into a byte buffer, without `core::fmt`.
//!
//! `write!` into a buffer runs the formatting machinery (`Formatter`, padding, one virtual
//! call per piece): measured under callgrind it cost about 1 700 instructions per request
//! for the two trace headers and 1 200 for `RateLimit`, more than the rest of the module's
//! traced, rate-limited path. The values the request path writes are short and their
//! shapes fixed, so each is written byte by byte here; their `Display` impls (for tests
//! and logs) go through the same code.

use std::fmt;

/// Text written into a fixed buffer; what does not fit is cut, and [`TextBuf::cut`] says so.
pub struct TextBuf<'a> {
    buf: &'a mut [u8],
    len: usize,
    cut: bool,
}

impl<'a> TextBuf<'a> {
    pub fn new(buf: &'a mut [u8]) -> TextBuf<'a> {
        TextBuf {
            buf,
            len: 0,
            cut: false,
        }
    }

    pub fn bytes(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        let to = &mut self.buf[self.len..self.len + n];
        if n <= 16 {
            // A call into memcpy costs more than the copy of a few bytes.
            for (t, &b) in to.iter_mut().zip(bytes) {
                *t = b;
            }
        } else {
            to.copy_from_slice(&bytes[..n]);
        }
        self.len += n;
        self.cut |= n < bytes.len();
    }

    pub fn byte(&mut self, b: u8) {
        match self.buf.get_mut(self.len) {
            Some(slot) => {
                *slot = b;
                self.len += 1;
            }
            None => self.cut = true,
        }
    }

    /// `bytes` as lowercase hex.
    pub fn hex(&mut self, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for &b in bytes {
            self.byte(DIGITS[usize::from(b >> 4)]);
            self.byte(DIGITS[usize::from(b & 0x0f)]);
        }
    }

    /// `v` in decimal.
    pub fn decimal(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 || at == 0 {
                break;
            }
        }
        self.bytes(&digits[at..]);
    }

    /// What was written.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether something did not fit.
    pub fn cut(&self) -> bool {
        self.cut
    }
}

/// A value that writes itself as text into a [`TextBuf`].
pub trait WriteText {
    /// The most bytes [`WriteText::write_text`] writes.
    fn max_len(&self) -> usize;

    fn write_text(&self, out: &mut TextBuf<'_>);
}

/// `Display` of a [`WriteText`] (for tests, logs and `to_string`): written into a buffer
/// of its [`WriteText::max_len`], then handed to the formatter.
pub fn display(value: &impl WriteText, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut buf = vec![0u8; value.max_len()];
    let mut out = TextBuf::new(&mut buf);
    value.write_text(&mut out);
    f.write_str(&String::from_utf8_lossy(out.as_bytes()))
}

impl WriteText for u64 {
    fn max_len(&self) -> usize {
        20
    }

    fn write_text(&self, out: &mut TextBuf<'_>) {
        out.decimal(*self);
    }
}

/// Byte strings one after another.
pub struct Concat<'a>(pub &'a [&'a [u8]]);

impl WriteText for Concat<'_> {
    fn max_len(&self) -> usize {
        self.0.iter().map(|p| p.len()).sum()
    }

    fn write_text(&self, out: &mut TextBuf<'_>) {
        for p in self.0 {
            out.bytes(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(value: &impl WriteText, room: usize) -> (Vec<u8>, bool) {
        let mut buf = vec![0u8; room];
        let mut out = TextBuf::new(&mut buf);
        value.write_text(&mut out);
        let cut = out.cut();
        (out.as_bytes().to_vec(), cut)
    }

    #[test]
    fn decimal_matches_display() {
        for v in [
            0,
            1,
            9,
            10,
            99,
            100,
            12345,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            assert_eq!(written(&v, 20), (v.to_string().into_bytes(), false));
        }
    }

    #[test]
    fn hex_is_lowercase_two_digits_a_byte() {
        let mut buf = [0u8; 8];
        let mut out = TextBuf::new(&mut buf);
        out.hex(&[0x00, 0x0f, 0xa0, 0xff]);
        assert_eq!(out.as_bytes(), b"000fa0ff");
    }

    #[test]
    fn what_does_not_fit_is_cut_and_said() {
        assert_eq!(
            written(&Concat(&[b"Bearer ", b"abc"]), 10),
            (b"Bearer abc".to_vec(), false)
        );
        assert_eq!(
            written(&Concat(&[b"Bearer ", b"abc"]), 8),
            (b"Bearer a".to_vec(), true)
        );
        assert_eq!(written(&12345u64, 3), (b"123".to_vec(), true));
    }
}
