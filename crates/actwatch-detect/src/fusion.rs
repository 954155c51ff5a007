//! fusion (being written)
