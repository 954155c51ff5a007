//! calibration (being written)
