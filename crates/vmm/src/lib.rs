//! ferrovmm
