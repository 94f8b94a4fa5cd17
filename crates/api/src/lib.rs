//! ferrovirt-api
