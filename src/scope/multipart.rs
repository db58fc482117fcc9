//! The model a `multipart/form-data` body names in its `model` field (RFC 7578), read as the
//! body streams by: OpenAI-style uploads (`audio/transcriptions`, `audio/translations`,
//! `images/edits`, `images/variations`, ...) send the model as a form field beside the file.
//!
//! [`MultipartScanner`] answers like the JSON scanner ([`ScanState`]): `Found` once the first
//! `model` field ended, `Ambiguous` when a second `model` field follows or the body stops being
//! well-formed after the model, `Absent` when the body names no usable model. Only the part
//! headers, the `model` value and a delimiter-sized tail are kept; file contents are skipped
//! with a substring search and never copied. This module does no I/O.

use super::attrs::{MAX_MODEL_LEN, ScanState};

/// Longest part header section kept: all header lines of one part and the CRLF before them.
const MAX_PART_HEADERS: usize = 16 * 1024;
/// Longest line after a delimiter (transport padding before its CRLF).
const MAX_DELIMITER_LINE: usize = 256;

/// The `boundary` parameter of a `multipart/form-data` content type, or `None` for another
/// type or a missing or invalid boundary (RFC 2046 §5.1.1: 1 to 70 characters).
pub fn form_data_boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("boundary") {
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            let ok = (1..=70).contains(&value.len())
                && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                && !value.ends_with(' ');
            return ok.then(|| value.to_string());
        }
    }
    None
}

/// Where the scanner is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Skipping bytes (preamble, or the content of a part other than `model`) until a
    /// delimiter.
    Skip,
    /// After a delimiter: `--` (the last one) or padding and CRLF.
    AfterDelimiter,
    /// Reading a part's header lines.
    Headers,
    /// Reading the content of a `model` part.
    Model,
    /// After the close delimiter: the epilogue is ignored.
    Done,
}

/// Reads the `model` field of a `multipart/form-data` body fed in chunks of any size.
pub struct MultipartScanner {
    /// `CRLF--boundary`.
    delimiter: Vec<u8>,
    state: State,
    /// The last bytes skipped, shorter than the delimiter, in case it straddles chunks.
    tail: Vec<u8>,
    /// The line after a delimiter, or a part's headers, or the model value (with a possible
    /// partial delimiter at its end).
    buf: Vec<u8>,
    /// The first `model` value.
    found: Option<String>,
    /// The final verdict, once there is one.
    finished: Option<ScanState>,
}

impl MultipartScanner {
    /// A scanner for a body with this boundary (see [`form_data_boundary`]).
    pub fn new(boundary: &str) -> MultipartScanner {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        MultipartScanner {
            delimiter,
            state: State::Skip,
            // The first delimiter may open the body without a CRLF before it.
            tail: b"\r\n".to_vec(),
            buf: Vec::new(),
            found: None,
            finished: None,
        }
    }

    /// Feeds the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> ScanState {
        if let Some(done) = &self.finished {
            return done.clone();
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            match self.step(rest) {
                Ok(used) => rest = &rest[used..],
                Err(verdict) => {
                    self.finished = Some(verdict.clone());
                    return verdict;
                }
            }
        }
        match &self.found {
            Some(m) => ScanState::Found(m.clone()),
            None => ScanState::NeedMore,
        }
    }

    /// The verdict once the body has ended.
    pub fn finish(&mut self) -> ScanState {
        if let Some(done) = &self.finished {
            return done.clone();
        }
        let verdict = match (&self.found, self.state) {
            (Some(m), State::Done) => ScanState::Found(m.clone()),
            // Cut off after the model: an upstream may read the body otherwise.
            (Some(_), _) => ScanState::Ambiguous,
            (None, _) => ScanState::Absent,
        };
        self.finished = Some(verdict.clone());
        verdict
    }

    /// What a malformed body means: no model if none was read yet, else ambiguous.
    fn malformed(&self) -> ScanState {
        match self.found {
            Some(_) => ScanState::Ambiguous,
            None => ScanState::Absent,
        }
    }

    /// Consumes a prefix of `data` and returns its length, or a final verdict.
    fn step(&mut self, data: &[u8]) -> Result<usize, ScanState> {
        match self.state {
            State::Done => Ok(data.len()),
            State::Skip => Ok(self.skip(data)),
            State::AfterDelimiter => {
                let (line, used) = self.take_until(data, b"\r\n", MAX_DELIMITER_LINE)?;
                let Some(line) = line else {
                    // The last delimiter needs no CRLF after its `--`.
                    if self.buf.starts_with(b"--") {
                        self.state = State::Done;
                    }
                    return Ok(used);
                };
                if line.starts_with(b"--") {
                    self.state = State::Done;
                } else if line.iter().all(|&b| b == b' ' || b == b'\t') {
                    self.state = State::Headers;
                    self.buf = b"\r\n".to_vec();
                } else {
                    // `--boundary` followed by more text: a boundary that occurs in content.
                    return Err(self.malformed());
                }
                Ok(used)
            }
            State::Headers => {
                // `buf` starts with the CRLF that ended the delimiter line, so a part without
                // headers ends its header section at once.
                let (headers, used) = self.take_until(data, b"\r\n\r\n", MAX_PART_HEADERS)?;
                if let Some(headers) = headers {
                    self.state = match field_name(headers.get(2..).unwrap_or_default()) {
                        Some(Field::Model) => State::Model,
                        Some(Field::Other) => State::Skip,
                        None => return Err(self.malformed()),
                    };
                    self.tail.clear();
                }
                Ok(used)
            }
            State::Model => {
                let limit = MAX_MODEL_LEN + self.delimiter.len();
                let delimiter = self.delimiter.clone();
                match self.take_until(data, &delimiter, limit) {
                    Ok((Some(value), used)) => {
                        if self.found.is_some() {
                            return Err(ScanState::Ambiguous);
                        }
                        match String::from_utf8(value) {
                            Ok(m) if !m.is_empty() && m.len() <= MAX_MODEL_LEN => {
                                self.found = Some(m)
                            }
                            _ => return Err(ScanState::Absent),
                        }
                        self.state = State::AfterDelimiter;
                        Ok(used)
                    }
                    Ok((None, used)) => Ok(used),
                    // Too long to be a model name.
                    Err(_) if self.found.is_some() => Err(ScanState::Ambiguous),
                    Err(_) => Err(ScanState::Absent),
                }
            }
        }
    }

    /// Skips content up to and including the next delimiter; returns the bytes consumed.
    fn skip(&mut self, data: &[u8]) -> usize {
        let d = std::mem::take(&mut self.delimiter);
        let used = self.skip_with(data, &d);
        self.delimiter = d;
        used
    }

    fn skip_with(&mut self, data: &[u8], d: &[u8]) -> usize {
        // A delimiter that starts in the kept tail and ends in `data`.
        if !self.tail.is_empty() {
            let head = &data[..data.len().min(d.len() - 1)];
            let mut joined = self.tail.clone();
            joined.extend_from_slice(head);
            if let Some(at) = memchr::memmem::find(&joined, d) {
                let end = at + d.len() - self.tail.len();
                self.found_delimiter();
                return end;
            }
        }
        if let Some(at) = memchr::memmem::find(data, d) {
            self.found_delimiter();
            return at + d.len();
        }
        let keep = d.len() - 1;
        if data.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - keep..]);
        } else {
            self.tail.extend_from_slice(data);
            let excess = self.tail.len().saturating_sub(keep);
            self.tail.drain(..excess);
        }
        data.len()
    }

    fn found_delimiter(&mut self) {
        self.tail.clear();
        self.buf.clear();
        self.state = State::AfterDelimiter;
    }

    /// Adds `data` to `buf` until `end` occurs in it: what preceded `end` (`None` while it has not
    /// occurred) and the bytes of `data` consumed. Fails once over `limit` bytes precede `end`.
    fn take_until(
        &mut self,
        data: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<(Option<Vec<u8>>, usize), ScanState> {
        let before = self.buf.len();
        // Only the bytes that could complete `end` need a second look.
        let from = before.saturating_sub(end.len() - 1);
        let room = (limit + end.len()).saturating_sub(before).max(1);
        let take = data.len().min(room);
        self.buf.extend_from_slice(&data[..take]);
        match memchr::memmem::find(&self.buf[from..], end) {
            Some(at) => {
                let at = from + at;
                let used = at + end.len() - before;
                let mut got = std::mem::take(&mut self.buf);
                got.truncate(at);
                Ok((Some(got), used))
            }
            None if self.buf.len() >= limit + end.len() => Err(self.malformed()),
            None => Ok((None, take)),
        }
    }
}

/// What a part is, from its headers.
enum Field {
    /// `Content-Disposition: form-data; name="model"`.
    Model,
    /// Any other part.
    Other,
}

/// Reads a part's `Content-Disposition` name. `None` for headers an upstream parser might read
/// another way: not `Name: value` lines, more than one `Content-Disposition`, a `name*`
/// (RFC 2231) parameter, or more than one `name`.
fn field_name(headers: &[u8]) -> Option<Field> {
    let text = std::str::from_utf8(headers).ok()?;
    if text.is_empty() {
        return Some(Field::Other);
    }
    let mut disposition = None;
    for line in text.split("\r\n") {
        let (name, value) = line.split_once(':')?;
        if name.is_empty() || name.bytes().any(|b| !b.is_ascii_graphic()) {
            return None;
        }
        if name.eq_ignore_ascii_case("content-disposition") {
            if disposition.is_some() {
                return None;
            }
            disposition = Some(value);
        }
    }
    let Some(disposition) = disposition else {
        return Some(Field::Other);
    };
    // The type, every key and every value must be well-formed: parsers split a stray quote or
    // backslash differently, so that one finds a `name` parameter where another does not.
    let mut params = split_params(disposition).into_iter();
    if !is_token(params.next().unwrap_or_default().trim()) {
        return None;
    }
    let mut names = Vec::new();
    for param in params {
        let (key, value) = param.split_once('=')?;
        let (key, value) = (key.trim(), unquote(value.trim())?);
        if !is_token(key) || key.eq_ignore_ascii_case("name*") {
            return None;
        }
        if key.eq_ignore_ascii_case("name") {
            names.push(value);
        }
    }
    match names.as_slice() {
        [name] if name == "model" => Some(Field::Model),
        [_] | [] => Some(Field::Other),
        _ => None,
    }
}

/// Splits a header value at `;` outside quoted strings.
fn split_params(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out
}

/// Whether `value` may stand unquoted: not empty, and no quote, backslash or space.
fn is_token(value: &str) -> bool {
    !value.is_empty() && !value.contains(['"', '\\', ' '])
}

/// A token or a quoted string (with `\` escapes), or `None` if malformed.
fn unquote(value: &str) -> Option<String> {
    let Some(inner) = value.strip_prefix('"') else {
        return is_token(value).then(|| value.into());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "----formdata-keyward-0123";

    fn part(name: &str, value: &str) -> String {
        format!("--{B}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
    }

    fn file(content: &str) -> String {
        format!(
            "--{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n\
             Content-Type: audio/mpeg\r\n\r\n{content}\r\n"
        )
    }

    fn close() -> String {
        format!("--{B}--\r\n")
    }

    /// Feeds `body` in pieces of `step` bytes and finishes.
    fn scan(body: &str, step: usize) -> ScanState {
        let mut s = MultipartScanner::new(B);
        for piece in body.as_bytes().chunks(step.max(1)) {
            if let v @ (ScanState::Ambiguous | ScanState::Absent) = s.feed(piece) {
                return v;
            }
        }
        s.finish()
    }

    fn every_split(body: &str) -> Vec<ScanState> {
        [1, 2, 3, 5, 7, 13, 64, body.len()]
            .iter()
            .map(|&step| scan(body, step))
            .collect()
    }

    #[test]
    fn boundary_is_read_from_the_content_type() {
        assert_eq!(
            form_data_boundary("multipart/form-data; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            form_data_boundary("Multipart/Form-Data;charset=x; BOUNDARY=\"a b:c\"").as_deref(),
            Some("a b:c")
        );
        assert_eq!(form_data_boundary("application/json"), None);
        assert_eq!(form_data_boundary("multipart/form-data"), None);
        assert_eq!(form_data_boundary("multipart/form-data; boundary="), None);
        let long = format!("multipart/form-data; boundary={}", "a".repeat(71));
        assert_eq!(form_data_boundary(&long), None);
    }

    #[test]
    fn the_model_field_is_found_wherever_the_chunks_split() {
        let file_first = format!(
            "{}{}{}{}",
            file("RIFF\r\n--not-the-boundary\r\n"),
            part("model", "whisper-1"),
            part("language", "en"),
            close()
        );
        let model_first = format!(
            "preamble\r\n{}{}{}",
            part("model", "gpt-image-1"),
            file(&"x".repeat(5000)),
            close()
        );
        for (body, want) in [(file_first, "whisper-1"), (model_first, "gpt-image-1")] {
            for got in every_split(&body) {
                assert_eq!(got, ScanState::Found(want.into()), "{body:?}");
            }
        }
    }

    #[test]
    fn no_model_field_is_absent() {
        let body = format!(
            "{}{}{}",
            part("purpose", "fine-tune"),
            file("data"),
            close()
        );
        for got in every_split(&body) {
            assert_eq!(got, ScanState::Absent);
        }
        // A name that only contains "model", a model value too long to be one, not UTF-8.
        for body in [
            format!("{}{}", part("model_x", "m"), close()),
            format!(
                "{}{}",
                part("model", &"m".repeat(MAX_MODEL_LEN + 1)),
                close()
            ),
            format!("{}{}", part("model", ""), close()),
        ] {
            for got in every_split(&body) {
                assert_eq!(got, ScanState::Absent, "{body:?}");
            }
        }
    }

    #[test]
    fn a_second_model_or_a_broken_body_after_it_is_ambiguous() {
        let cases = [
            format!("{}{}{}", part("model", "a"), part("model", "b"), close()),
            format!("{}{}{}", part("model", "a"), part("MODEL", "a"), close())
                .replace("name=\"MODEL\"", "name=model"),
            // Cut off before the close delimiter.
            format!("{}{}", part("model", "a"), file("partial")),
            // A part whose headers an upstream could read as another model.
            format!(
                "{}--{B}\r\nContent-Disposition: form-data; name*=utf-8''model\r\n\r\nb\r\n{}",
                part("model", "a"),
                close()
            ),
            format!(
                "{}--{B}\r\nContent-Disposition: form-data; name=\"x\"; name=\"model\"\r\n\r\n\
                 b\r\n{}",
                part("model", "a"),
                close()
            ),
            // The boundary followed by other text where a delimiter line must end.
            format!("{}--{B}junk\r\n{}", part("model", "a"), close()),
        ];
        for body in &cases {
            for got in every_split(body) {
                assert_eq!(got, ScanState::Ambiguous, "{body:?}");
            }
        }
    }

    #[test]
    fn quoted_names_and_parameters_are_read_like_a_form_parser() {
        let body = format!(
            "--{B}\r\ncontent-disposition: form-data; filename=\"a;name=x\"; NAME=\"mo\\del\"\r\n\
             \r\nwhisper-1\r\n{}",
            close()
        );
        for got in every_split(&body) {
            assert_eq!(got, ScanState::Found("whisper-1".into()));
        }
        assert!(field_name(b"no colon").is_none());
        assert!(
            field_name(b"Content-Disposition: form-data\r\nContent-Disposition: form-data")
                .is_none()
        );
    }

    #[test]
    fn the_epilogue_is_ignored() {
        let body = format!("{}{}{}", part("model", "a"), close(), part("model", "b"));
        for got in every_split(&body) {
            assert_eq!(got, ScanState::Found("a".into()));
        }
    }

    #[test]
    fn transport_padding_after_a_delimiter_is_skipped() {
        // RFC 2046 §5.1.1: spaces and tabs may follow a boundary before its CRLF.
        let body = format!(
            "--{B} \t\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
             --{B}\t \r\nContent-Disposition: form-data; name=\"file\"\r\n\r\ndata\r\n{}",
            close()
        );
        for got in every_split(&body) {
            assert_eq!(got, ScanState::Found("whisper-1".into()));
        }
    }

    #[test]
    fn a_boundary_followed_by_other_text_in_a_file_opens_no_part() {
        // To a form parser such as Go's this is all file content and the form names no model;
        // reading `gpt-4o-mini` from it would let a key limited to that model serve whatever
        // model the upstream picks for a form without one.
        let hidden =
            format!("--{B}x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-mini");
        let body = format!("{}{}", file(&format!("RIFF\r\n{hidden}")), close());
        for got in every_split(&body) {
            assert_eq!(got, ScanState::Absent);
        }
    }

    /// A file part whose header lines, with the CRLF before them, are `len` bytes.
    fn file_with_headers(len: usize) -> String {
        let head = "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"";
        let pad = "a".repeat(len - head.len() - 1);
        format!("--{B}{head}{pad}\"\r\n\r\ndata\r\n")
    }

    #[test]
    fn part_headers_are_read_up_to_their_limit_in_any_chunking() {
        // The 16 KiB the limit promises (a long file name, several headers), written out here
        // rather than read back from the code under test.
        let (fits, over) = (16 * 1024, 16 * 1024 + 1);
        let model = || part("model", "whisper-1");
        for (body, want) in [
            (
                format!("{}{}{}", file_with_headers(fits), model(), close()),
                ScanState::Found("whisper-1".into()),
            ),
            (
                format!("{}{}{}", model(), file_with_headers(fits), close()),
                ScanState::Found("whisper-1".into()),
            ),
            // Too long to keep before the model: no model; after it: unreadable, refused.
            (
                format!("{}{}{}", file_with_headers(over), model(), close()),
                ScanState::Absent,
            ),
            (
                format!("{}{}{}", model(), file_with_headers(over), close()),
                ScanState::Ambiguous,
            ),
        ] {
            for got in every_split(&body) {
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn a_model_value_is_read_up_to_the_longest_name_and_no_further() {
        let longest = "m".repeat(MAX_MODEL_LEN);
        let body = format!("{}{}", part("model", &longest), close());
        for got in every_split(&body) {
            assert_eq!(got, ScanState::Found(longest.clone()));
        }
        // Far too long to be a name: no model alone, refused after a model.
        let long = "m".repeat(16 * MAX_MODEL_LEN);
        for (body, want) in [
            (
                format!("{}{}", part("model", &long), close()),
                ScanState::Absent,
            ),
            (
                format!("{}{}{}", part("model", "a"), part("model", &long), close()),
                ScanState::Ambiguous,
            ),
        ] {
            for got in every_split(&body) {
                assert_eq!(got, want);
            }
        }
        // The scanner gives up once the value cannot be a name, rather than holding it.
        let mut s = MultipartScanner::new(B);
        let head = format!("--{B}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n");
        assert_eq!(s.feed(head.as_bytes()), ScanState::NeedMore);
        let mut fed = 0;
        while s.feed(&[b'm'; 16]) == ScanState::NeedMore {
            fed += 16;
            assert!(fed <= 1 << 20, "still reading a {fed}-byte model value");
        }
        assert!(
            fed <= MAX_MODEL_LEN + 2 * (B.len() + 4),
            "gave up after {fed} bytes"
        );
    }

    #[test]
    fn file_contents_are_not_kept() {
        let mut s = MultipartScanner::new(B);
        let head = file("");
        let head = head.strip_suffix("\r\n").unwrap();
        assert_eq!(s.feed(head.as_bytes()), ScanState::NeedMore);
        for _ in 0..4 {
            assert_eq!(s.feed(&[b'x'; 64 * 1024]), ScanState::NeedMore);
            // Only a tail short of a delimiter, in case one straddles two chunks.
            assert!(s.tail.len() < s.delimiter.len() && s.buf.is_empty());
        }
        let model = format!("\r\n{}", part("model", "a"));
        assert_eq!(s.feed(model.as_bytes()), ScanState::NeedMore);
        assert_eq!(s.feed(close().as_bytes()), ScanState::Found("a".into()));
    }

    #[test]
    fn part_headers_a_parser_could_read_as_another_model_field_are_refused() {
        // Each part would be skipped by a strict reading, yet a lenient parser (one that trims
        // header names, splits at every `;`, unquotes keys, or treats `\` as an escape anywhere)
        // finds a `model` in it. After the model that makes the form ambiguous; before it,
        // unreadable.
        let smuggled = [
            "Content-Disposition : form-data; name=\"model\"",
            ": form-data; name=\"model\"",
            "Content-Disposition: form-data; filename=a\"; name=\"model\"",
            "Content-Disposition: form-data; filename=a\\\"; name=\"model\"",
            "Content-Disposition: form-data; filename=a\\; name=\"model\"",
            "Content-Disposition: form-data\\; name=\"model\"",
            "Content-Disposition: form-data; file\"name=\"a; name=\"model\"",
            "Content-Disposition: form-data; \"name\"=model",
            "Content-Disposition: form-data; name=model x",
            "Content-Disposition: form-data; name=",
        ];
        for headers in smuggled {
            let odd = format!("--{B}\r\n{headers}\r\n\r\ngpt-4o\r\n");
            let after = format!("{}{odd}{}", part("model", "gpt-4o-mini"), close());
            for got in every_split(&after) {
                assert_eq!(got, ScanState::Ambiguous, "{headers}");
            }
            let before = format!("{odd}{}{}", part("model", "gpt-4o-mini"), close());
            for got in every_split(&before) {
                assert_eq!(got, ScanState::Absent, "{headers}");
            }
        }
    }

    #[test]
    fn escapes_and_tokens_are_read_as_rfc_7578_writes_them() {
        // A quoted filename holding an escaped quote and a `;`, then a `name` token.
        let body = format!(
            "--{B}\r\nContent-Disposition: form-data; filename=\"a\\\";b.mp3\"; name=model\r\n\
             \r\nwhisper-1\r\n{}",
            close()
        );
        for got in every_split(&body) {
            assert_eq!(got, ScanState::Found("whisper-1".into()));
        }
    }

    #[test]
    fn a_span_within_its_limit_is_taken_in_one_call() {
        // Part headers of exactly the limit, then their end, arrive in one chunk: one call takes
        // them all. A scanner that took less would crawl through the rest a byte per call.
        let mut s = MultipartScanner::new(B);
        let data = [vec![b'x'; MAX_PART_HEADERS], b"\r\n\r\nrest".to_vec()].concat();
        let (got, used) = s
            .take_until(&data, b"\r\n\r\n", MAX_PART_HEADERS)
            .unwrap_or_else(|_| panic!("refused"));
        assert_eq!(got.map(|g| g.len()), Some(MAX_PART_HEADERS));
        assert_eq!(used, MAX_PART_HEADERS + 4);
        // One byte more is refused, also in one call.
        let mut s = MultipartScanner::new(B);
        let data = [vec![b'x'; MAX_PART_HEADERS + 1], b"\r\n\r\n".to_vec()].concat();
        assert!(s.take_until(&data, b"\r\n\r\n", MAX_PART_HEADERS).is_err());
    }
}
