//! knn (being written)
