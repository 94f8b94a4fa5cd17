//! ferrovirtd
