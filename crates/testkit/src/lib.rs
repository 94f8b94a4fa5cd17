//! ferrovirt-testkit
