//! ferrovirt-disk
