//! A streaming scanner of PostgreSQL 15 WAL: fed the bytes of consecutive segments, it finds
//! each transaction end (commit, abort, and their prepared forms) with its timestamp, and where
//! valid WAL stops (a zeroed or recycled tail, a torn or corrupt record). Memory is bounded by
//! the largest record: only the record being read is buffered.

use chrono::{DateTime, Utc};
use crc_fast::{CrcAlgorithm, Digest as CrcDigest};

/// A transaction's end found in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XactEnd {
    /// LSN of its record.
    pub start: u64,
    /// LSN just past the record (not aligned).
    pub end: u64,
    pub time: DateTime<Utc>,
    pub kind: XactKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XactKind {
    Commit,
    Abort,
    CommitPrepared,
    AbortPrepared,
}

const BLCKSZ: u64 = 8192;
const PAGE_MAGIC: u16 = 0xD110;
const SHORT_HDR: usize = 24;
const LONG_HDR: usize = 40;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const XLP_ALL_FLAGS: u16 = 0x000F;

/// SizeOfXLogRecord: the header up to and including xl_crc.
const REC_HDR: usize = 24;
/// offsetof(XLogRecord, xl_crc): the part of the header the CRC covers (after the data).
const CRC_OFFSET: usize = 20;
/// A length PostgreSQL could never allocate (MaxAllocSize) is garbage, not a record.
const MAX_REC: u32 = 0x3FFF_FFFF;
/// Above the built-in resource managers and below the custom ones, no rmid is valid.
const RM_MAX_BUILTIN_ID: u8 = 21;
const RM_MIN_CUSTOM_ID: u8 = 128;

const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const XLR_INFO_MASK: u8 = 0x0F;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_XACT_OPMASK: u8 = 0x70;

const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const XLR_MAX_BLOCK_ID: u8 = 32;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// PGLZ, LZ4 and ZSTD: a compressed image carries its hole length in an extra header.
const BKPIMAGE_COMPRESSED: u8 = 0x04 | 0x08 | 0x10;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00 UTC).
const PG_EPOCH_US: i64 = 946_684_800 * 1_000_000;

/// A record buffer this large is given back once its record is done, so one huge record
/// does not pin its memory for the rest of the stream.
const KEEP_CAPACITY: usize = 1 << 20;

/// What the next body byte (a byte that is not a page header's) is.
enum Body {
    /// Continuation bytes of a record begun before the scan's start: this many remain.
    Skip(u64),
    /// Padding up to this LSN: MAXALIGN, or the rest of a segment after XLOG_SWITCH (`raw`:
    /// the page headers in it are not read either).
    Pad { until: u64, raw: bool },
    /// Between records: the next body byte starts one.
    Idle,
    /// A record being read: its LSN and bytes so far (header included).
    Record { start: u64 },
}

/// Streaming WAL record scanner; see the module doc.
pub struct WalScanner {
    pos: u64,
    /// Known from the first page's long header.
    seg_size: u64,
    /// The page header being read, when `pos` is inside one.
    hdr: Option<Vec<u8>>,
    body: Body,
    buf: Vec<u8>,
    /// The LSN of the last valid record, which the next one's xl_prev must name.
    prev: Option<u64>,
    valid_end: u64,
    ended: bool,
    first_page: bool,
}

impl WalScanner {
    /// Scans from `start`, an LSN at a segment boundary (the first page's xlp_rem_len tells
    /// where the first whole record begins; continuation bytes of a record begun before are
    /// skipped).
    pub fn new(start: u64) -> WalScanner {
        WalScanner {
            pos: start,
            seg_size: 0,
            hdr: None,
            body: Body::Idle,
            buf: Vec::new(),
            prev: None,
            valid_end: start,
            ended: false,
            first_page: true,
        }
    }

    /// Feeds the next bytes (contiguous with what was fed before). Returns the transaction
    /// ends whose records are complete within what has been fed. Once the end of valid WAL is
    /// found (a zero or impossible xl_tot_len, a page whose header's magic/pageaddr does not
    /// match, a record whose xl_prev or CRC-32C does not check out), the scanner is `ended()`
    /// and ignores further input; that is not an error.
    pub fn feed(&mut self, data: &[u8]) -> Vec<XactEnd> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < data.len() && !self.ended {
            if let Body::Pad { until, .. } = self.body
                && self.pos >= until
            {
                self.body = Body::Idle;
            }
            let raw = matches!(self.body, Body::Pad { raw: true, .. });
            if self.pos.is_multiple_of(BLCKSZ) && self.hdr.is_none() && !raw {
                self.hdr = Some(Vec::with_capacity(LONG_HDR));
            }
            if let Some(h) = self.hdr.as_mut() {
                let need = if h.len() >= 4 && u16le(h, 2) & XLP_LONG_HEADER != 0 {
                    LONG_HDR
                } else {
                    SHORT_HDR
                };
                let n = (need - h.len()).min(data.len() - i);
                h.extend_from_slice(&data[i..i + n]);
                i += n;
                self.pos += n as u64;
                if h.len() == SHORT_HDR && need == SHORT_HDR && u16le(h, 2) & XLP_LONG_HEADER != 0 {
                    continue; // a long header: read the rest of it
                }
                if h.len() == need {
                    let h = self.hdr.take().unwrap_or_default();
                    self.page_header(&h);
                }
                continue;
            }
            let page_left = (BLCKSZ - self.pos % BLCKSZ) as usize;
            let avail = (data.len() - i).min(page_left);
            match self.body {
                Body::Skip(rem) => {
                    let n = (rem.min(avail as u64)) as usize;
                    i += n;
                    self.pos += n as u64;
                    self.body = if rem == n as u64 {
                        Body::Pad {
                            until: maxalign(self.pos),
                            raw: false,
                        }
                    } else {
                        Body::Skip(rem - n as u64)
                    };
                }
                Body::Pad { until, .. } => {
                    let n = ((until - self.pos).min(avail as u64)) as usize;
                    i += n;
                    self.pos += n as u64;
                }
                Body::Idle => {
                    self.body = Body::Record { start: self.pos };
                    self.buf.clear();
                }
                Body::Record { start } => {
                    let need = if self.buf.len() < 4 {
                        4
                    } else if self.buf.len() < REC_HDR {
                        REC_HDR
                    } else {
                        u32le(&self.buf, 0) as usize
                    };
                    let n = (need - self.buf.len()).min(avail);
                    self.buf.extend_from_slice(&data[i..i + n]);
                    i += n;
                    self.pos += n as u64;
                    if self.buf.len() == need {
                        self.record_step(start, &mut out);
                    }
                }
            }
        }
        if i < data.len() {
            self.pos += (data.len() - i) as u64;
        }
        out
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The LSN just past the last whole valid record seen (the end of usable WAL so far).
    /// After an XLOG_SWITCH record it is the next segment's start, as PostgreSQL counts it.
    pub fn valid_end(&self) -> u64 {
        self.valid_end
    }

    /// Bytes fed so far, as an LSN.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn end(&mut self) {
        self.ended = true;
        self.buf = Vec::new();
    }

    /// Checks a whole page header (`self.pos` is just past it) against where it is and what
    /// the record being read expects of it.
    fn page_header(&mut self, h: &[u8]) {
        let page = self.pos - self.pos % BLCKSZ;
        let Some(ph) = PageHeader::parse(h) else {
            return self.end();
        };
        if ph.magic != PAGE_MAGIC || ph.info & !XLP_ALL_FLAGS != 0 || ph.pageaddr != page {
            return self.end();
        }
        if self.first_page {
            self.first_page = false;
            match ph.seg_size {
                Some(s) if s.is_power_of_two() && (1 << 20..=1 << 30).contains(&s) => {
                    self.seg_size = s;
                }
                _ => return self.end(),
            }
            if ph.blcksz != Some(BLCKSZ as u32) {
                return self.end();
            }
            if ph.info & XLP_FIRST_IS_CONTRECORD != 0 {
                self.body = Body::Skip(u64::from(ph.rem_len));
            }
            return;
        }
        if page.is_multiple_of(self.seg_size) != ph.seg_size.is_some()
            || ph.seg_size.is_some_and(|s| s != self.seg_size)
        {
            return self.end();
        }
        let cont = ph.info & XLP_FIRST_IS_CONTRECORD != 0;
        match self.body {
            Body::Skip(rem) => {
                if !cont || u64::from(ph.rem_len) != rem {
                    self.end();
                }
            }
            Body::Record { .. } if !self.buf.is_empty() => {
                // The header is never split before xl_tot_len: records are MAXALIGNed.
                let left = u64::from(u32le(&self.buf, 0)) - self.buf.len() as u64;
                if !cont || u64::from(ph.rem_len) != left {
                    self.end();
                }
            }
            // A record starts right after this header: the page must not say it continues one.
            _ => {
                if cont {
                    self.end();
                }
            }
        }
    }

    /// A record's buffer reached its next size: its xl_tot_len (4), its header (24) or all.
    fn record_step(&mut self, start: u64, out: &mut Vec<XactEnd>) {
        let len = self.buf.len();
        let tot = u32le(&self.buf, 0);
        if len == 4 {
            if (tot as usize) < REC_HDR || tot > MAX_REC {
                self.end();
            }
            return;
        }
        if len == REC_HDR {
            let rmid = self.buf[17];
            let prev_ok = self.prev.is_none_or(|p| u64le(&self.buf, 8) == p);
            if !prev_ok || (rmid > RM_MAX_BUILTIN_ID && rmid < RM_MIN_CUSTOM_ID) {
                self.end();
                return;
            }
            if tot as usize > REC_HDR {
                return;
            }
        }
        // Whole: PostgreSQL's CRC covers the data first, then the header up to xl_crc.
        let mut d = CrcDigest::new(CrcAlgorithm::Crc32Iscsi);
        d.update(&self.buf[REC_HDR..]);
        d.update(&self.buf[..CRC_OFFSET]);
        if d.finalize() as u32 != u32le(&self.buf, CRC_OFFSET) {
            return self.end();
        }
        let info = self.buf[16];
        let rmid = self.buf[17];
        self.prev = Some(start);
        self.valid_end = self.pos;
        if rmid == RM_XACT_ID
            && let Some(kind) = xact_kind(info)
        {
            match main_data(&self.buf).and_then(xact_time) {
                Some(time) => out.push(XactEnd {
                    start,
                    end: self.pos,
                    time,
                    kind,
                }),
                // A CRC-valid record PostgreSQL itself could not decode.
                None => return self.end(),
            }
        }
        self.body = if rmid == RM_XLOG_ID && info & !XLR_INFO_MASK == XLOG_SWITCH {
            let until = self.pos.div_ceil(self.seg_size) * self.seg_size;
            self.valid_end = until;
            Body::Pad { until, raw: true }
        } else {
            Body::Pad {
                until: maxalign(self.pos),
                raw: false,
            }
        };
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        }
    }
}

/// A page header's fields (the long header's too when present).
#[derive(Debug, PartialEq, Eq)]
struct PageHeader {
    magic: u16,
    info: u16,
    pageaddr: u64,
    rem_len: u32,
    seg_size: Option<u64>,
    blcksz: Option<u32>,
}

impl PageHeader {
    fn parse(h: &[u8]) -> Option<PageHeader> {
        if h.len() < SHORT_HDR {
            return None;
        }
        let info = u16le(h, 2);
        let long = info & XLP_LONG_HEADER != 0;
        if long && h.len() < LONG_HDR {
            return None;
        }
        Some(PageHeader {
            magic: u16le(h, 0),
            info,
            pageaddr: u64le(h, 8),
            rem_len: u32le(h, 16),
            seg_size: long.then(|| u64::from(u32le(h, 32))),
            blcksz: long.then(|| u32le(h, 36)),
        })
    }
}

fn xact_kind(info: u8) -> Option<XactKind> {
    match info & XLOG_XACT_OPMASK {
        0x00 => Some(XactKind::Commit),
        0x20 => Some(XactKind::Abort),
        0x30 => Some(XactKind::CommitPrepared),
        0x40 => Some(XactKind::AbortPrepared),
        _ => None,
    }
}

/// A record's main data: its block references walked as DecodeXLogRecord does; the main
/// data is the last part of the record, after every block's image and data.
fn main_data(rec: &[u8]) -> Option<&[u8]> {
    let mut p = REC_HDR;
    let mut datatotal: usize = 0;
    let mut main_len: usize = 0;
    let byte = |p: &mut usize| -> Option<u8> {
        let b = *rec.get(*p)?;
        *p += 1;
        Some(b)
    };
    let u16at = |p: &mut usize| -> Option<u16> {
        let b = rec.get(*p..*p + 2)?;
        *p += 2;
        Some(u16::from_le_bytes([b[0], b[1]]))
    };
    let skip = |p: &mut usize, n: usize| -> Option<()> {
        rec.get(*p..*p + n)?;
        *p += n;
        Some(())
    };
    while rec.len() - p > datatotal {
        match byte(&mut p)? {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = usize::from(byte(&mut p)?);
                datatotal += main_len;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                let b = rec.get(p..p + 4)?;
                p += 4;
                main_len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                datatotal += main_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => skip(&mut p, 2)?,
            XLR_BLOCK_ID_TOPLEVEL_XID => skip(&mut p, 4)?,
            id if id <= XLR_MAX_BLOCK_ID => {
                let fork_flags = byte(&mut p)?;
                datatotal += usize::from(u16at(&mut p)?);
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    datatotal += usize::from(u16at(&mut p)?); // bimg_len
                    skip(&mut p, 2)?; // hole_offset
                    let bimg_info = byte(&mut p)?;
                    if bimg_info & BKPIMAGE_HAS_HOLE != 0 && bimg_info & BKPIMAGE_COMPRESSED != 0 {
                        skip(&mut p, 2)?; // hole_length
                    }
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    skip(&mut p, 12)?; // RelFileNode
                }
                skip(&mut p, 4)?; // BlockNumber
            }
            _ => return None,
        }
    }
    if rec.len() - p != datatotal {
        return None;
    }
    rec.get(rec.len() - main_len..)
}

/// xl_xact_commit / xl_xact_abort begin with `TimestampTz xact_time`.
fn xact_time(main: &[u8]) -> Option<DateTime<Utc>> {
    let us = i64::from_le_bytes(main.get(..8)?.try_into().ok()?);
    DateTime::from_timestamp_micros(us.checked_add(PG_EPOCH_US)?)
}

fn maxalign(lsn: u64) -> u64 {
    lsn.next_multiple_of(8)
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64le(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_header(pageaddr: u64, info: u16, rem_len: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&PAGE_MAGIC.to_le_bytes());
        h.extend_from_slice(&(info | XLP_LONG_HEADER).to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&pageaddr.to_le_bytes());
        h.extend_from_slice(&rem_len.to_le_bytes());
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&7u64.to_le_bytes());
        h.extend_from_slice(&(16u32 << 20).to_le_bytes());
        h.extend_from_slice(&8192u32.to_le_bytes());
        h
    }

    #[test]
    fn long_page_header_decodes() {
        let h = long_header(0x0100_0000, XLP_FIRST_IS_CONTRECORD, 123);
        assert_eq!(h.len(), LONG_HDR);
        assert_eq!(
            PageHeader::parse(&h),
            Some(PageHeader {
                magic: PAGE_MAGIC,
                info: XLP_LONG_HEADER | XLP_FIRST_IS_CONTRECORD,
                pageaddr: 0x0100_0000,
                rem_len: 123,
                seg_size: Some(16 << 20),
                blcksz: Some(8192),
            })
        );
        // A long header cut to a short one's size is not a header.
        assert_eq!(PageHeader::parse(&h[..SHORT_HDR]), None);
    }

    #[test]
    fn first_page_skips_the_continuation_then_ends_at_zeros() {
        let mut s = WalScanner::new(0x0100_0000);
        let mut seg = long_header(0x0100_0000, XLP_FIRST_IS_CONTRECORD, 13);
        seg.resize(8192, 0xAB); // continuation then alignment, then (below) zeros
        seg[LONG_HDR + 16..].fill(0);
        assert!(s.feed(&seg).is_empty());
        assert!(s.ended(), "a zero xl_tot_len is the end of WAL");
        assert_eq!(s.valid_end(), 0x0100_0000);
        assert_eq!(s.position(), 0x0100_0000 + 8192);
    }

    #[test]
    fn a_page_with_the_wrong_address_ends_the_scan() {
        let mut s = WalScanner::new(0x0200_0000);
        s.feed(&long_header(0x0100_0000, 0, 0));
        assert!(s.ended());
    }

    #[test]
    fn main_data_follows_the_block_data() {
        // One block with an image (hole, uncompressed), a new relation, 3 bytes of data; then
        // 8 bytes of main data after the 5-byte image and the block data.
        let mut r = vec![0u8; REC_HDR];
        r.extend_from_slice(&[0, BKPBLOCK_HAS_IMAGE, 3, 0]);
        r.extend_from_slice(&[5, 0, 0, 1, BKPIMAGE_HAS_HOLE]);
        r.extend_from_slice(&[0; 12]);
        r.extend_from_slice(&[0; 4]);
        r.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, 8]);
        r.extend_from_slice(&[1; 5]);
        r.extend_from_slice(&[2; 3]);
        let t: i64 = 86_400_000_000; // 2000-01-02
        r.extend_from_slice(&t.to_le_bytes());
        let main = main_data(&r).unwrap();
        assert_eq!(main, &t.to_le_bytes());
        assert_eq!(
            xact_time(main).unwrap().to_rfc3339(),
            "2000-01-02T00:00:00+00:00"
        );
        // One byte too many: DecodeXLogRecord's length check fails.
        r.push(0);
        assert_eq!(main_data(&r), None);
    }
}
