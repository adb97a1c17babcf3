//! CPU kernels of our own, where candle's are missing or slow.
//!
//! candle 0.11 has SIMD kernels for Q4_0, Q8_0 and the K-quants but computes Q4_1 with a
//! scalar loop; Q4_1 is the default model's format, so it gets an AVX2 kernel here. Paged
//! attention reads the KV cache in place instead of gathering it through tensor ops.

pub mod attention;
pub mod q4_1;
