//! ferrovirt
