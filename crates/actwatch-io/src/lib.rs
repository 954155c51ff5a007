//! actwatch-io
