//! Where captured traces go: [`TraceSink`], and [`ParquetSink`] (a long-format Parquet file);
//! `crate::ingest::ServerSink` streams them into a server instead.

use std::path::{Path, PathBuf};

use actwatch_core::SiteBatch;
use actwatch_io::reader::TraceColumns;
use actwatch_io::writer::TraceWriter;

use crate::capture::{OutputColumns, Pool};
use crate::{Error, Result};

/// Receives the traces of one site for a run of sequences, in input order (positions with
/// [`Pool::None`] only). The site is the hidden-state index, as a name (`"2"`).
pub trait TraceSink {
    fn write(&mut self, batch: SiteBatch) -> Result<()>;
}

/// Writes traces to a Parquet file in the long format (through actwatch-io's [`TraceWriter`], the
/// writer of the server's reference segments too); the file appears only when
/// [`ParquetSink::finish`] succeeds (dropped unfinished, it leaves nothing behind).
pub struct ParquetSink {
    path: PathBuf,
    columns: OutputColumns,
    per_token: bool,
    writer: Option<TraceWriter>,
}

impl ParquetSink {
    pub fn new(path: &Path, columns: OutputColumns, pool: Pool) -> Self {
        Self {
            path: path.to_path_buf(),
            columns,
            per_token: pool == Pool::None,
            writer: None,
        }
    }

    /// Finishes the file (fsync, rename into place); returns the rows written. Nothing captured
    /// still writes a valid, empty file only if a width is known, so an empty input is an error.
    pub fn finish(self) -> Result<u64> {
        match self.writer {
            Some(w) => Ok(w.finish()?),
            None => Err(Error::InvalidOption(format!(
                "nothing captured: no input rows, so {} was not written",
                self.path.display()
            ))),
        }
    }
}

impl TraceSink for ParquetSink {
    fn write(&mut self, batch: SiteBatch) -> Result<()> {
        let writer = match &mut self.writer {
            Some(w) => w,
            None => {
                let columns = TraceColumns::new(
                    &self.columns.trace,
                    &self.columns.site,
                    &self.columns.vector,
                );
                let positions = self.per_token.then_some(self.columns.position.as_str());
                self.writer.insert(TraceWriter::create(
                    &self.path,
                    batch.dim(),
                    &columns,
                    positions,
                )?)
            }
        };
        if batch.dim() != writer.width() {
            return Err(Error::InvalidOption(format!(
                "site {} has width {}, an earlier site {}: one Parquet vector column holds one \
                 width (capture those sites into separate files)",
                batch.site(),
                batch.dim(),
                writer.width()
            )));
        }
        Ok(writer.write(batch)?)
    }
}
