//! gaussian (being written)
