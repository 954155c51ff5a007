//! shrinkage (being written)
