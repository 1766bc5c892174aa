//! Scalar functions the kernels vectorise: exact GELU and its derivative through a rational
//! erf, and a range-reduced exp.

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

#[inline(always)]
pub(crate) fn gelu_derivative(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
    cdf + x * FRAC_1_SQRT_2PI * exp_nonpositive(-0.5 * x * x)
}

/// erf for f32: odd/even rational minimax approximation on [-4, 4] (|error| about 1e-7,
/// the float's own resolution), saturating outside, where erf is ±1 in f32.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_600_1e-3;
    p = p * x2 - 1.609_603_3e-2;
    p *= x;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_473_9e-2;
    p / q
}

/// e^y for y <= 0: y = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, and 2^n
/// built in the exponent bits. Relative error about 2e-7; inputs below -87 give e^-87
/// (1.6e-38), which is zero for every use here.
#[inline(always)]
pub(crate) fn exp_nonpositive(y: f32) -> f32 {
    let y = y.max(-87.0);
    // Round to nearest with the 1.5 * 2^23 trick (vectorises without SSE4.1's round).
    const SHIFTER: f32 = 12_582_912.0;
    let n = (y * std::f32::consts::LOG2_E + SHIFTER) - SHIFTER;
    let r = y - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let mut e = 1.0 / 720.0_f32;
    e = e * r + 1.0 / 120.0;
    e = e * r + 1.0 / 24.0;
    e = e * r + 1.0 / 6.0;
    e = e * r + 0.5;
    e = e * r + 1.0;
    e = e * r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    e * f32::from_bits(bits)
}
