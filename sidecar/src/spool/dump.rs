//! `logtally dump`: a segment (or every segment of a folder, in name order) as JSON lines.
//!
//! One line per item, each with `"segment"` (file name) and `"offset"` (byte offset of the
//! item in the file):
//! - `{"segment":..,"offset":0,"header":{"writer_pid":..,"created_ms":..,"fields":[..]},"header_len":N}`
//! - `{"segment":..,"offset":..,"time_ms":..,"fields":{"ad":"7","rt":null,...}}`: an event;
//!   fields in header order, an absent value is `null`, an empty one `""`. A value that is
//!   not valid UTF-8 is written as `{"hex":"61ff62"}` (its bytes in lowercase hex), so the
//!   output is lossless and a string always means the value was valid UTF-8;
//! - `{"segment":..,"offset":..,"time_ms":..,"dropped":N}`: a drop marker;
//! - `{"segment":..,"offset":..,"time_ms":..,"sealed":{"events":N,"dropped":N}}`: the seal;
//! - `{"segment":..,"offset":..,"corrupt_bytes":N}`: bytes skipped as corrupt;
//! - `{"segment":..,"offset":..,"torn_bytes":N}`: an incomplete frame at the end (a writer
//!   mid-write, or one that died);
//! - `{"segment":..,"offset":0,"error":".."}` for an unreadable header, or
//!   `{"segment":..,"offset":0,"incomplete_header_bytes":N}` for a header still being written.
//!
//! Reads through a bounded buffer, never the whole file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use logtally_spool::{
    decode_header, is_segment_file_name, SegmentHeader, SegmentItem, SegmentReader,
    FRAME_HEADER_LEN, MAX_PAYLOAD_LEN,
};

/// What a dump found, for the exit status and a summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpSummary {
    pub segments: u64,
    pub events: u64,
    pub corrupt_bytes: u64,
    pub torn_bytes: u64,
    pub bad_headers: u64,
}

/// Dumps `path`: a segment file, or a folder whose segment files are dumped in name order.
pub fn dump_path(path: &Path, out: &mut dyn Write) -> io::Result<DumpSummary> {
    let mut summary = DumpSummary::default();
    if path.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_segment_file_name(n))
            .collect();
        names.sort_unstable();
        for name in names {
            dump_segment(&path.join(&name), &name, out, &mut summary)?;
        }
    } else {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        dump_segment(path, &name, out, &mut summary)?;
    }
    Ok(summary)
}

/// Dumps one segment file.
pub fn dump_segment(
    path: &Path,
    name: &str,
    out: &mut dyn Write,
    summary: &mut DumpSummary,
) -> io::Result<()> {
    dump_reader(File::open(path)?, name, out, summary)
}

/// Dumps a segment read from `input` (named `name` in the output).
pub fn dump_reader(
    mut input: impl Read,
    name: &str,
    out: &mut dyn Write,
    summary: &mut DumpSummary,
) -> io::Result<()> {
    summary.segments += 1;
    let seg = json_string(name);
    let mut buf = vec![0u8; 4 * (FRAME_HEADER_LEN + MAX_PAYLOAD_LEN)];
    let mut filled = fill(&mut input, &mut buf, 0)?;

    let (header, header_len) = match decode_header(&buf[..filled]) {
        Ok(Some(h)) => h,
        Ok(None) => {
            writeln!(
                out,
                r#"{{"segment":{seg},"offset":0,"incomplete_header_bytes":{filled}}}"#
            )?;
            summary.bad_headers += 1;
            return Ok(());
        }
        Err(e) => {
            let msg = json_string(&e.to_string());
            writeln!(out, r#"{{"segment":{seg},"offset":0,"error":{msg}}}"#)?;
            summary.bad_headers += 1;
            return Ok(());
        }
    };
    write_header(out, &seg, &header, header_len)?;
    let names: Vec<String> = header.fields.iter().map(|f| json_string(f)).collect();

    let mut start = 0u64; // file offset of buf[0]
    let mut from = header_len; // where in buf the frames start
    let mut corrupt: Option<(u64, u64)> = None; // a run of skipped bytes being gathered
    let mut torn = None;
    loop {
        let mut reader = SegmentReader::new(&buf[from..filled], start + from as u64);
        for item in reader.by_ref() {
            let at = item.offset();
            if let SegmentItem::Corrupt { len, .. } = item {
                corrupt.get_or_insert((at, 0)).1 += len as u64;
                summary.corrupt_bytes += len as u64;
                continue;
            }
            if let Some((off, len)) = corrupt.take() {
                writeln!(
                    out,
                    r#"{{"segment":{seg},"offset":{off},"corrupt_bytes":{len}}}"#
                )?;
            }
            match item {
                SegmentItem::Event { record, .. } => {
                    summary.events += 1;
                    write!(
                        out,
                        r#"{{"segment":{seg},"offset":{at},"time_ms":{},"fields":{{"#,
                        record.time_ms
                    )?;
                    let mut values = record.values();
                    for (i, name) in names.iter().enumerate() {
                        if i > 0 {
                            out.write_all(b",")?;
                        }
                        write!(out, "{name}:")?;
                        match values.next().flatten() {
                            None => out.write_all(b"null")?,
                            Some(v) => write_value(out, v)?,
                        }
                    }
                    writeln!(out, "}}}}")?;
                }
                SegmentItem::Dropped { time_ms, count, .. } => {
                    writeln!(
                        out,
                        r#"{{"segment":{seg},"offset":{at},"time_ms":{time_ms},"dropped":{count}}}"#
                    )?;
                }
                SegmentItem::Seal {
                    time_ms,
                    events,
                    dropped,
                    ..
                } => writeln!(
                    out,
                    r#"{{"segment":{seg},"offset":{at},"time_ms":{time_ms},"sealed":{{"events":{events},"dropped":{dropped}}}}}"#
                )?,
                SegmentItem::Torn { len, .. } => torn = Some((at, len)),
                SegmentItem::Corrupt { .. } => {}
            }
        }
        // Keep the undecided rest, read more after it.
        let consumed = from + reader.consumed();
        buf.copy_within(consumed..filled, 0);
        start += consumed as u64;
        filled -= consumed;
        from = 0;
        let before = filled;
        filled = fill(&mut input, &mut buf, filled)?;
        if filled == before {
            break;
        }
        torn = None;
    }
    if let Some((off, len)) = corrupt.take() {
        writeln!(
            out,
            r#"{{"segment":{seg},"offset":{off},"corrupt_bytes":{len}}}"#
        )?;
    }
    if let Some((off, torn)) = torn {
        summary.torn_bytes += torn as u64;
        writeln!(
            out,
            r#"{{"segment":{seg},"offset":{off},"torn_bytes":{torn}}}"#
        )?;
    }
    Ok(())
}

fn write_header(out: &mut dyn Write, seg: &str, h: &SegmentHeader, len: usize) -> io::Result<()> {
    let fields = serde_json::to_string(&h.fields).map_err(io::Error::other)?;
    writeln!(
        out,
        r#"{{"segment":{seg},"offset":0,"header":{{"writer_pid":{},"created_ms":{},"fields":{fields}}},"header_len":{len}}}"#,
        h.writer_pid, h.created_ms
    )
}

/// Reads until `buf` is full or the input ends; returns the new fill level.
fn fill(input: &mut impl Read, buf: &mut [u8], mut filled: usize) -> io::Result<usize> {
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialise")
}

/// A value: a JSON string when valid UTF-8, else `{"hex":"…"}`.
fn write_value(out: &mut dyn Write, v: &[u8]) -> io::Result<()> {
    match std::str::from_utf8(v) {
        Ok(s) => out.write_all(json_string(s).as_bytes()),
        Err(_) => {
            out.write_all(br#"{"hex":""#)?;
            for b in v {
                write!(out, "{b:02x}")?;
            }
            out.write_all(br#""}"#)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logtally_spool::{encode_drop_marker, encode_event, encode_header, encode_seal};
    use serde_json::{json, Value};

    fn segment() -> Vec<u8> {
        let mut b = Vec::new();
        let h = SegmentHeader {
            writer_pid: 42,
            created_ms: 7,
            fields: vec!["ad".into(), "ua".into(), "rt".into()],
        };
        encode_header(&h, &mut b).unwrap();
        encode_event(&mut b, 1000, [Some(&b"7"[..]), Some(b"a\xffb\"q"), None]);
        encode_event(&mut b, 1001, [Some(&b""[..])]);
        b
    }

    fn lines(bytes: &[u8]) -> (Vec<Value>, DumpSummary) {
        let mut out = Vec::new();
        let mut s = DumpSummary::default();
        dump_reader(bytes, "s.seg", &mut out, &mut s).unwrap();
        let v = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        (v, s)
    }

    #[test]
    fn events_drops_and_seal() {
        let mut b = segment();
        let hlen = decode_header(&b).unwrap().unwrap().1;
        let first_len = match SegmentReader::new(&b[hlen..], hlen as u64).next() {
            Some(SegmentItem::Event { len, .. }) => len,
            other => panic!("{other:?}"),
        };
        encode_drop_marker(&mut b, 1002, 3);
        encode_seal(&mut b, 1003, 2, 3);
        let (v, s) = lines(&b);
        assert_eq!(v.len(), 5);
        assert_eq!(
            v[0],
            json!({"segment":"s.seg","offset":0,"header":{"writer_pid":42,"created_ms":7,"fields":["ad","ua","rt"]},"header_len":hlen})
        );
        assert_eq!(
            v[1],
            json!({"segment":"s.seg","offset":hlen,"time_ms":1000,"fields":{"ad":"7","ua":{"hex":"61ff622271"},"rt":null}})
        );
        assert_eq!(v[2]["offset"], json!(hlen + first_len));
        assert_eq!(v[2]["fields"], json!({"ad":"","ua":null,"rt":null}));
        assert_eq!(v[3]["dropped"], json!(3));
        assert_eq!(v[4]["sealed"], json!({"events":2,"dropped":3}));
        assert_eq!(
            s,
            DumpSummary {
                segments: 1,
                events: 2,
                ..DumpSummary::default()
            }
        );
    }

    #[test]
    fn corruption_and_torn_tail() {
        let mut b = segment();
        let good_len = b.len();
        b.extend_from_slice(b"\xde\xad\xbe\xef junk");
        let mut e = Vec::new();
        encode_event(&mut e, 5, [Some(&b"x"[..])]);
        b.extend_from_slice(&e);
        b.extend_from_slice(&e[..e.len() - 2]);
        let (v, s) = lines(&b);
        let corrupt: Vec<&Value> = v
            .iter()
            .filter(|l| l.get("corrupt_bytes").is_some())
            .collect();
        assert_eq!(corrupt.len(), 1);
        assert_eq!(corrupt[0]["offset"], json!(good_len));
        assert_eq!(corrupt[0]["corrupt_bytes"], json!(9));
        assert_eq!(v[v.len() - 2]["fields"]["ad"], json!("x"));
        assert_eq!(v.last().unwrap()["torn_bytes"], json!(e.len() - 2));
        assert_eq!(
            (s.events, s.corrupt_bytes, s.torn_bytes),
            (3, 9, (e.len() - 2) as u64)
        );
    }

    #[test]
    fn bad_and_incomplete_headers() {
        let b = segment();
        let (v, s) = lines(&b[..10]);
        assert_eq!(v[0]["incomplete_header_bytes"], json!(10));
        assert_eq!(s.bad_headers, 1);
        let mut bad = b.clone();
        bad[0] = b'X';
        let (v, _) = lines(&bad);
        assert!(
            v[0]["error"].as_str().unwrap().contains("bad magic"),
            "{v:?}"
        );
    }

    #[test]
    fn large_files_stream_through_the_buffer() {
        let mut b = segment();
        let big = vec![b'z'; 4000];
        for i in 0..2000u64 {
            encode_event(&mut b, i, [Some(&big[..])]);
        }
        let (v, s) = lines(&b);
        assert_eq!(s.events, 2002);
        assert_eq!(s.corrupt_bytes + s.torn_bytes, 0);
        assert_eq!(v.len(), 2003);
    }

    #[test]
    fn folder_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0000000000002-1-000001.seg"), segment()).unwrap();
        std::fs::write(dir.path().join("0000000000001-1-000001.seg"), segment()).unwrap();
        std::fs::write(dir.path().join("README"), b"x").unwrap();
        let mut out = Vec::new();
        let s = dump_path(dir.path(), &mut out).unwrap();
        assert_eq!(s.segments, 2);
        let text = String::from_utf8(out).unwrap();
        let first = text.lines().next().unwrap();
        assert!(first.contains("0000000000001-1-000001.seg"), "{first}");
    }
}
