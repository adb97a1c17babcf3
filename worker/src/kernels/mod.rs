//! CPU kernels of our own, where candle's are missing or slow.
//!
//! candle 0.11 computes Q4_1 (the default model's format) with a scalar loop and Q8_0 (its
//! tied embedding, the lm_head) a row at a time, so both get AVX2 kernels here. Paged attention
//! reads the KV cache in place instead of gathering it through tensor ops.

pub mod attention;
pub mod quant_matmul;
