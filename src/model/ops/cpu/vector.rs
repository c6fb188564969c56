//! Vectorised f32 row kernels (erf-GELU, tanh-GELU, ReLU, residual LayerNorm, softmax) with the instruction set
//! chosen at run time: each kernel body is compiled once for AVX-512, once for AVX2+FMA and once for plain x86-64
//! (or the target's baseline), and the widest one the CPU supports is called.
//!
//! The bodies are branch-free loops over fixed-width lane arrays, which the compiler turns into SIMD code for
//! the enabled instruction set; reductions keep LANES partial sums so they vectorise without reassociating.

use std::sync::OnceLock;

use super::super::FeedForwardActivation;

/// Partial sums kept per reduction: one AVX-512 register of f32.
const LANES: usize = 16;

/// The widest instruction set this CPU offers that the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    Avx512,
    Avx2,
    Baseline,
}

impl SimdLevel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2 => "avx2+fma",
            Self::Baseline => "baseline",
        }
    }
}

/// Detected once per process.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("fma")
    {
        SimdLevel::Avx512
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        SimdLevel::Avx2
    } else {
        SimdLevel::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Baseline
}

/// Defines `pub fn $name` that runs `$body` (an `#[inline(always)]` function) compiled for the detected level.
macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match simd_level() {
                    // SAFETY: the CPU supports the features each version was compiled for (checked at run time).
                    SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    SimdLevel::Baseline => {}
                }
            }
            $body($($arg),*)
        }
    };
}

multiversion! {
    /// x[i] = act(x[i] + bias[i % n]) over rows of n = bias.len().
    pub fn bias_activation(x: &mut [f32], bias: &[f32], activation: FeedForwardActivation)
        => bias_activation_body
}

multiversion! {
    /// x = LayerNorm(x + bias + residual) per row of n = bias.len(), with gain and shift.
    pub fn add_bias_layer_norm(
        x: &mut [f32],
        bias: &[f32],
        residual: &[f32],
        norm: NormParams<'_>
    ) => add_bias_layer_norm_body
}

multiversion! {
    /// Each row of `scores` (rows of `len`) becomes exp(row - max(row)); each row's sum goes to `sums`.
    pub fn softmax_numerators(scores: &mut [f32], len: usize, sums: &mut [f32]) => softmax_numerators_body
}

multiversion! {
    /// x[i] += bias[i % n] over rows of n = bias.len().
    pub fn add_bias(x: &mut [f32], bias: &[f32]) => add_bias_body
}

multiversion! {
    /// out[i] = x[i] rounded to bf16 (nearest even); `out` may be uninitialised.
    pub fn to_bf16(x: &[f32], out: &mut [std::mem::MaybeUninit<u16>]) => to_bf16_body
}

multiversion! {
    /// x[i] *= factor.
    pub fn scale(x: &mut [f32], factor: f32) => scale_body
}

/// LayerNorm's gain, shift and epsilon.
#[derive(Clone, Copy)]
pub struct NormParams<'a> {
    pub gain: &'a [f32],
    pub shift: &'a [f32],
    pub eps: f32,
}

#[inline(always)]
fn bias_activation_body(x: &mut [f32], bias: &[f32], activation: FeedForwardActivation) {
    let n = bias.len();
    for row in x.chunks_exact_mut(n) {
        match activation {
            FeedForwardActivation::GeluErf => {
                for (v, &b) in row.iter_mut().zip(bias) {
                    *v = gelu_erf(*v + b);
                }
            }
            FeedForwardActivation::GeluTanh => {
                for (v, &b) in row.iter_mut().zip(bias) {
                    *v = gelu_tanh(*v + b);
                }
            }
            FeedForwardActivation::Relu => {
                for (v, &b) in row.iter_mut().zip(bias) {
                    *v = (*v + b).max(0.0);
                }
            }
            FeedForwardActivation::Silu => {
                for (v, &b) in row.iter_mut().zip(bias) {
                    *v = silu(*v + b);
                }
            }
        }
    }
}

#[inline(always)]
fn add_bias_layer_norm_body(x: &mut [f32], bias: &[f32], residual: &[f32], norm: NormParams<'_>) {
    let n = bias.len();
    for (o, r) in x.chunks_exact_mut(n).zip(residual.chunks_exact(n)) {
        for ((o, &r), &b) in o.iter_mut().zip(r).zip(bias) {
            *o += b + r;
        }
        let mean = lane_sum(o, |v| v) / n as f32;
        let var = lane_sum(o, |v| (v - mean) * (v - mean)) / n as f32;
        let inv = 1.0 / (var + norm.eps).sqrt();
        for ((o, &g), &s) in o.iter_mut().zip(norm.gain).zip(norm.shift) {
            *o = (*o - mean) * inv * g + s;
        }
    }
}

#[inline(always)]
fn softmax_numerators_body(scores: &mut [f32], len: usize, sums: &mut [f32]) {
    for (row, sum) in scores.chunks_exact_mut(len).zip(sums.iter_mut()) {
        let max = lane_max(row);
        // Exponentiate and sum in one pass over the row.
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (a, s) in acc.iter_mut().zip(chunk.iter_mut()) {
                *s = exp(*s - max);
                *a += *s;
            }
        }
        let mut total = 0f32;
        for s in chunks.into_remainder() {
            *s = exp(*s - max);
            total += *s;
        }
        *sum = acc.iter().sum::<f32>() + total;
    }
}

#[inline(always)]
fn add_bias_body(x: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    for row in x.chunks_exact_mut(n) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

#[inline(always)]
fn to_bf16_body(x: &[f32], out: &mut [std::mem::MaybeUninit<u16>]) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(bf16_bits(v));
    }
}

/// f32 → bf16 bits, rounding to nearest even as torch does; NaN stays a (quiet) NaN. Branch-free, so loops
/// over it vectorise.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let is_nan = bits & 0x7fff_ffff > 0x7f80_0000;
    if is_nan {
        0x7fc0
    } else {
        rounded
    }
}

#[inline(always)]
fn scale_body(x: &mut [f32], factor: f32) {
    for v in x.iter_mut() {
        *v *= factor;
    }
}

/// Σ f(v) with LANES partial sums (vectorisable; the order differs from a sequential sum only by rounding).
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

#[inline(always)]
fn lane_max(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.max(v);
        }
    }
    acc.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Exact GELU, 0.5·x·(1 + erf(x/√2)).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// x·sigmoid(x) = x / (1 + exp(-x)); exp's clamp keeps both tails finite (→ 0 and → x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// GELU with the tanh approximation, as transformers' "gelu_new": tanh(u) = 1 - 2 / (exp(2u) + 1).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    let tanh = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    0.5 * x * (1.0 + tanh)
}

/// erf(x) as x·P(x²)/Q(x²) on x clamped to [-4, 4] (erf is ±1 in f32 beyond): a rational minimax fit, within
/// 5e-7 of the exact value over the whole line (tested below against a series in f64).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_600_1e-3,
        -1.609_603_3e-2,
    ];
    const Q: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329e-3,
        -1.426_473_9e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = P.iter().skip(1).fold(P[0], |acc, &c| acc * x2 + c) * x;
    let q = Q.iter().skip(1).fold(Q[0], |acc, &c| acc * x2 + c);
    p / q
}

/// e^x by range reduction to r = x - n·ln2 (|r| ≤ ln2/2) and a degree-6 polynomial (Cephes' expf
/// coefficients), then 2^n through the exponent bits; relative error about 2e-7. Inputs below -87 give ~0.
/// n is rounded by adding 1.5·2^23, which leaves it as an integer in the low mantissa bits: integer and float
/// both come out of one addition without a float-to-int conversion, which would not vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits());
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in f64: its Taylor series up to |x| = 3, beyond 1 - erfc(|x|) by erfc's continued fraction.
    fn erf_reference(x: f64) -> f64 {
        if x.abs() > 3.0 {
            let a = x.abs();
            let mut t = a;
            for n in (1..=80).rev() {
                t = a + (n as f64 / 2.0) / t;
            }
            let erfc = (-a * a).exp() / (std::f64::consts::PI.sqrt() * t);
            return x.signum() * (1.0 - erfc);
        }
        let (mut sum, mut term, mut n) = (0.0, x, 0.0);
        while n < 200.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn grid(lo: f32, hi: f32, steps: usize) -> impl Iterator<Item = f32> {
        (0..=steps).map(move |i| lo + (hi - lo) * i as f32 / steps as f32)
    }

    #[test]
    fn erf_is_accurate_to_f32_rounding() {
        let worst = grid(-6.0, 6.0, 200_000)
            .map(|x| (erf(x) as f64 - erf_reference(x as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 6e-7, "max |erf error| {worst}");
    }

    #[test]
    fn exp_is_accurate_to_f32_rounding() {
        let worst = grid(-87.0, 88.0, 400_000)
            .map(|x| ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 4e-7, "max relative exp error {worst}");
        assert!(exp(-1000.0) < 1e-37);
    }

    #[test]
    fn every_instruction_set_gives_the_same_rows() {
        let n = 37;
        let x: Vec<f32> = (0..n * 5)
            .map(|i| ((i * 7919) % 113) as f32 / 10.0 - 5.0)
            .collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 / 50.0 - 0.3).collect();
        for activation in [
            FeedForwardActivation::GeluErf,
            FeedForwardActivation::GeluTanh,
            FeedForwardActivation::Relu,
        ] {
            let (mut dispatched, mut plain) = (x.clone(), x.clone());
            bias_activation(&mut dispatched, &bias, activation);
            bias_activation_body(&mut plain, &bias, activation);
            for (a, b) in dispatched.iter().zip(&plain) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{activation:?}");
            }
        }
        let gain = vec![1.5f32; n];
        let shift = vec![0.25f32; n];
        let norm = NormParams {
            gain: &gain,
            shift: &shift,
            eps: 1e-12,
        };
        let (mut dispatched, mut plain) = (x.clone(), x.clone());
        add_bias_layer_norm(&mut dispatched, &bias, &x, norm);
        add_bias_layer_norm_body(&mut plain, &bias, &x, norm);
        for (a, b) in dispatched.iter().zip(&plain) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn softmax_rows_sum_to_their_normaliser() {
        let mut scores: Vec<f32> = (0..3 * 21).map(|i| (i % 11) as f32 - 4.0).collect();
        let original = scores.clone();
        let mut sums = [0f32; 3];
        softmax_numerators(&mut scores, 21, &mut sums);
        for ((row, orig), sum) in scores.chunks(21).zip(original.chunks(21)).zip(sums) {
            let max = orig.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for (p, o) in row.iter().zip(orig) {
                assert!((p - (o - max).exp()).abs() < 1e-6);
            }
            assert!((row.iter().sum::<f32>() - sum).abs() < 1e-5);
        }
    }
}
