//! Arrow IPC files (the file format: `ARROW1`, a footer listing the blocks), read as the Parquet
//! files are: the server's reference segments ([`crate::writer::AtomicIpcWriter`]) and any such
//! file given as input.
//!
//! The footer is read and every block it lists is checked to lie inside the file before anything
//! is allocated for it, and each record batch's header (its row count) is read when the file is
//! opened; a block is then read whole (at most the file's length) and decoded by arrow's
//! [`FileDecoder`], which validates the arrays. So a corrupt or hostile file costs at most its own
//! size in memory and fails with [`Error::Ipc`] naming it.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use arrow::buffer::{Buffer, MutableBuffer};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::ipc::reader::{read_footer_length, FileDecoder};
use arrow::ipc::{Block, MetadataVersion};
use arrow::record_batch::RecordBatch;

use crate::{Error, Result};

/// The magic bytes at both ends of an Arrow IPC file.
const MAGIC: &[u8; 6] = b"ARROW1";

/// The most bytes of one block's header (its flatbuffer message) read when a file is opened. A
/// record batch's header is a few hundred bytes per column; this only bounds a hostile one.
const MAX_HEADER_BYTES: i32 = 16 << 20;

/// Whether the file starts with the Arrow IPC file magic (the file's read position is left at
/// its start).
pub(super) fn is_ipc(path: &Path, file: &mut File) -> Result<bool> {
    let mut head = [0u8; 6];
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    Ok(read == head.len() && &head == MAGIC)
}

/// One record batch's block in an IPC file, checked to lie inside the file, with its rows.
#[derive(Debug, Clone, Copy)]
struct RecordBlock {
    block: Block,
    rows: u64,
}

/// What the footer of an IPC file says, checked against the file.
#[derive(Debug)]
pub(super) struct IpcLayout {
    pub(super) schema: SchemaRef,
    /// The footer's key-value metadata (where actwatch keeps a segment's provenance).
    pub(super) metadata: HashMap<String, String>,
    pub(super) rows: u64,
    version: MetadataVersion,
    dictionaries: Vec<Block>,
    batches: Vec<RecordBlock>,
}

/// Runs a call into arrow's IPC decoder, turning a panic into an error naming the file (as
/// [`super::guarded`] does for the Parquet decoder).
fn guarded<T>(path: &Path, call: impl FnOnce() -> Result<T, ArrowError>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(r) => r.map_err(|e| Error::ipc(path, e)),
        Err(panic) => Err(Error::ipc(
            path,
            ArrowError::IpcError(format!(
                "the Arrow IPC decoder failed on corrupt data: {}",
                super::panic_message(&*panic)
            )),
        )),
    }
}

fn bad(message: String) -> ArrowError {
    ArrowError::IpcError(message)
}

/// Reads `len` bytes at `offset` into a buffer of exactly that size (the caller has checked that
/// they lie inside the file), allocated 64-byte aligned as arrow's buffers are, so that a body's
/// 8-byte aligned buffers are aligned in memory too.
fn read_at(file: &mut File, offset: u64, len: usize) -> Result<Buffer, ArrowError> {
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = MutableBuffer::from_len_zeroed(len);
    file.read_exact(buf.as_slice_mut())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => bad(format!(
                "the file ends inside a block ({len} bytes at offset {offset})"
            )),
            _ => e.into(),
        })?;
    Ok(buf.into())
}

/// Checks that `block` lies inside the file's first `end` bytes (before the footer) and after the
/// leading magic; returns its length.
fn check_block(block: &Block, end: u64) -> Result<usize, ArrowError> {
    let header = block.metaDataLength();
    // After the leading magic, and 8-byte aligned as the format requires (so is the header's
    // length, which puts the body at a multiple of 8 too).
    let inside = u64::try_from(block.offset())
        .ok()
        .filter(|&o| o >= 8 && o % 8 == 0 && header % 8 == 0)
        .zip(u64::try_from(block.bodyLength()).ok())
        .filter(|_| header > 0 && header <= MAX_HEADER_BYTES)
        .and_then(|(o, body)| {
            let len = body.checked_add(header as u64)?;
            (o.checked_add(len)? <= end).then_some(len)
        });
    inside
        .and_then(|len| usize::try_from(len).ok())
        .ok_or_else(|| {
            bad(format!(
                "a block (offset {}, header {header} bytes, body {} bytes) lies outside the \
                 file's {end} bytes of data or is not 8-byte aligned",
                block.offset(),
                block.bodyLength()
            ))
        })
}

/// The record batch a block's header describes (a dictionary block's: its values), once its
/// buffers are checked to lie inside the block's body (arrow's decoder slices them unchecked, and
/// panics). Returns its rows.
fn check_header(file: &mut File, block: &Block, dictionary: bool) -> Result<u64, ArrowError> {
    let header = read_at(file, block.offset() as u64, block.metaDataLength() as usize)?;
    // A header is a 0xFFFFFFFF continuation marker and a 4-byte length, then the flatbuffer
    // (older writers: the length alone).
    let skip = if header.len() >= 8 && header[..4] == [0xff; 4] {
        8
    } else {
        4
    };
    let message = header
        .get(skip..)
        .ok_or_else(|| bad("a block's header is shorter than its length prefix".into()))
        .and_then(|fb| {
            arrow::ipc::root_as_message(fb)
                .map_err(|e| bad(format!("a block's header is not a message: {e}")))
        })?;
    let batch = match dictionary {
        false => message.header_as_record_batch(),
        true => message.header_as_dictionary_batch().and_then(|d| d.data()),
    }
    .ok_or_else(|| bad("a block holds another kind of message than its place says".into()))?;
    let body = block.bodyLength();
    // Inside the body, and where the format puts buffers: at multiples of 8 bytes (arrow's
    // validation reads offsets at a misaligned place as a slice of `i32` and panics).
    for buffer in batch.buffers().into_iter().flatten() {
        let inside = buffer.offset() >= 0
            && buffer.offset() % 8 == 0
            && buffer.length() >= 0
            && buffer
                .offset()
                .checked_add(buffer.length())
                .is_some_and(|end| end <= body);
        if !inside {
            return Err(bad(format!(
                "a buffer (offset {}, {} bytes) lies outside its block's {body} bytes or is not \
                 8-byte aligned",
                buffer.offset(),
                buffer.length()
            )));
        }
    }
    let rows = u64::try_from(batch.length())
        .map_err(|_| bad(format!("a record batch declares {} rows", batch.length())))?;
    // A record batch of traces holds at most a row per byte of its body (a trace's vector is at
    // least one byte, and never null), a dictionary at most a value per bit: a header that
    // declares more is corrupt, and would have the decoder allocate for rows that are not there.
    let most = (body as u64).saturating_mul(if dictionary { 8 } else { 1 });
    if rows > most {
        return Err(bad(format!("a block declares {rows} rows in {body} bytes")));
    }
    Ok(rows)
}

/// Reads and checks the footer of the IPC file `file` (and the header of every block it lists).
pub(super) fn read_layout(path: &Path, file: &mut File) -> Result<IpcLayout> {
    guarded(path, || {
        let len = file.metadata()?.len();
        // The leading magic and its padding (8 bytes), the trailing length and magic (10).
        if len < 18 {
            return Err(bad(format!(
                "{len} bytes is too short for an Arrow IPC file"
            )));
        }
        let trailer = read_at(file, len - 10, 10)?;
        let mut tail = [0u8; 10];
        tail.copy_from_slice(&trailer);
        let footer_len = read_footer_length(tail)? as u64;
        if footer_len > len - 18 {
            return Err(bad(format!(
                "the footer declares {footer_len} bytes in a file of {len}"
            )));
        }
        let end = len - 10 - footer_len;
        let footer_bytes = read_at(file, end, footer_len as usize)?;
        let footer = arrow::ipc::root_as_footer(&footer_bytes)
            .map_err(|e| bad(format!("the footer is not a valid flatbuffer: {e}")))?;
        let fb_schema = footer
            .schema()
            .ok_or_else(|| bad("the footer has no schema".into()))?;
        if !fb_schema.endianness().equals_to_target_endianness() {
            return Err(bad("the file's byte order is not this machine's".into()));
        }
        let schema = Arc::new(arrow::ipc::convert::try_fb_to_schema(fb_schema)?);
        let mut metadata = HashMap::new();
        for kv in footer.custom_metadata().into_iter().flatten() {
            if let (Some(k), Some(v)) = (kv.key(), kv.value()) {
                metadata.insert(k.to_string(), v.to_string());
            }
        }
        let dictionaries: Vec<Block> = footer
            .dictionaries()
            .into_iter()
            .flatten()
            .copied()
            .collect();
        for d in &dictionaries {
            check_block(d, end)?;
            check_header(file, d, true)?;
        }
        let blocks: Vec<Block> = footer
            .recordBatches()
            .ok_or_else(|| bad("the footer lists no record batches".into()))?
            .iter()
            .copied()
            .collect();
        let version = footer.version();
        let mut batches = Vec::with_capacity(blocks.len());
        let mut rows = 0u64;
        for block in blocks {
            check_block(&block, end)?;
            let n = check_header(file, &block, false)?;
            rows = rows.checked_add(n).ok_or_else(|| {
                bad("the record batches declare more rows than fit in 64 bits".into())
            })?;
            batches.push(RecordBlock { block, rows: n });
        }
        Ok(IpcLayout {
            schema,
            metadata,
            rows,
            version,
            dictionaries,
            batches,
        })
    })
}

/// The record batches of one IPC file, in order, regrouped into batches of `batch_rows` rows (the
/// last may be shorter): consecutive blocks are joined and long ones sliced, so a file written a
/// few rows at a time reads in batches as large as a Parquet file's.
pub(super) struct IpcBatches {
    path: Arc<std::path::PathBuf>,
    file: File,
    layout: Arc<IpcLayout>,
    decoder: FileDecoder,
    next_block: usize,
    batch_rows: usize,
    /// Decoded rows not yet handed out.
    queued: VecDeque<RecordBatch>,
    queued_rows: usize,
}

impl IpcBatches {
    pub(super) fn open(
        path: Arc<std::path::PathBuf>,
        mut file: File,
        layout: Arc<IpcLayout>,
        batch_rows: usize,
    ) -> Result<Self> {
        let mut decoder = FileDecoder::new(layout.schema.clone(), layout.version);
        guarded(&path, || {
            for block in &layout.dictionaries {
                let len = check_block(block, u64::MAX)?;
                let buf = read_at(&mut file, block.offset() as u64, len)?;
                decoder.read_dictionary(block, &buf)?;
            }
            Ok(())
        })?;
        Ok(Self {
            path,
            file,
            layout,
            decoder,
            next_block: 0,
            batch_rows: batch_rows.max(1),
            queued: VecDeque::new(),
            queued_rows: 0,
        })
    }

    /// Decodes the next block (`None` at the end).
    fn read_block(&mut self) -> Result<Option<RecordBatch>> {
        let Some(&RecordBlock { block, rows }) = self.layout.batches.get(self.next_block) else {
            return Ok(None);
        };
        self.next_block += 1;
        let (file, decoder) = (&mut self.file, &self.decoder);
        let batch = guarded(&self.path, || {
            let len = check_block(&block, u64::MAX)?;
            let buf = read_at(file, block.offset() as u64, len)?;
            decoder
                .read_record_batch(&block, &buf)?
                .ok_or_else(|| bad("a record batch block is empty".into()))
        })?;
        if batch.num_rows() as u64 != rows {
            return Err(Error::ipc(
                self.path.as_path(),
                bad(format!(
                    "a record batch holds {} rows, its header {rows}",
                    batch.num_rows()
                )),
            ));
        }
        Ok(Some(batch))
    }

    /// The next batch of at most `batch_rows` rows, `None` at the end of the file.
    pub(super) fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        while self.queued_rows < self.batch_rows {
            match self.read_block()? {
                Some(b) => {
                    self.queued_rows += b.num_rows();
                    self.queued.push_back(b);
                }
                None => break,
            }
        }
        if self.queued_rows == 0 {
            return Ok(None);
        }
        let want = self.batch_rows.min(self.queued_rows);
        let mut parts = Vec::new();
        let mut taken = 0;
        while taken < want {
            let b = self
                .queued
                .pop_front()
                .expect("queued rows are in queued batches");
            let n = b.num_rows();
            if taken + n <= want {
                taken += n;
                parts.push(b);
            } else {
                let k = want - taken;
                parts.push(b.slice(0, k));
                self.queued.push_front(b.slice(k, n - k));
                taken = want;
            }
        }
        self.queued_rows -= want;
        let batch = match parts.len() {
            1 => parts.pop().expect("one part"),
            _ => arrow::compute::concat_batches(&self.layout.schema, &parts)?,
        };
        Ok(Some(batch))
    }
}
