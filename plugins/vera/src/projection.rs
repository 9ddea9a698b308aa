//! VeRA's shared frozen projections exactly as peft 0.21 makes them:
//! `torch.Generator(device="cpu").manual_seed(projection_prng_key)`, then
//! `vera_A = empty(r, in).uniform_(±bound)` and `vera_B = empty(out, r).uniform_(±bound)` from
//! that generator (kaiming-uniform, `bound = √3 · √2 / √fan_in`).
//!
//! The generator is reproduced here (torch's CPU generator is a 32-bit Mersenne Twister,
//! `at::mt19937`, seeded with the key's low 32 bits), so the host's global libtorch RNG is never
//! touched. A float is drawn as torch's `uniform_real_distribution<float>`:
//! `x = (u32 & (2²⁴ − 1)) · 2⁻²⁴`, `x · (to − from) + from` with one rounding (a fused
//! multiply-add, as torch's vectorised x86-64 (AVX2 / AVX-512) and aarch64 kernels compute
//! it). peft itself warns that a regenerated projection "may not be accurate on all system
//! configurations"; with `save_projection: true` (the default) the saved projections are
//! loaded instead.
use tch::{Kind, Tensor};

const N: usize = 624;
const M: usize = 397;

/// The 32-bit Mersenne Twister (MT19937) as torch's `at::mt19937`.
pub struct Mt19937 {
    state: [u32; N],
    index: usize,
}

impl Mt19937 {
    /// torch's `manual_seed(seed)`: the low 32 bits of the seed initialise the state.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Self { state, index: N }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut v = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    /// One float of torch's `uniform_(from, to)` on a float32 CPU tensor.
    fn uniform(&mut self, from: f32, to: f32) -> f32 {
        let x = (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32);
        x.mul_add(to - from, from)
    }

    /// peft's `_kaiming_init(shape, generator)` of a 2-D float32 tensor (`fan_in` = columns).
    pub fn kaiming_uniform(&mut self, rows: i64, cols: i64) -> Tensor {
        let bound = 3f64.sqrt() * (2f64.sqrt() / (cols as f64).sqrt());
        let (from, to) = (-bound as f32, bound as f32);
        let values: Vec<f32> = (0..rows * cols).map(|_| self.uniform(from, to)).collect();
        Tensor::from_slice(&values).view([rows, cols])
    }
}

/// `(vera_A [r, inp], vera_B [out, r])` for projection key `seed`, float32 on the CPU.
pub fn projections(seed: i64, r: i64, out: i64, inp: i64) -> (Tensor, Tensor) {
    let mut g = Mt19937::new(seed as u64);
    let a = g.kaiming_uniform(r, inp);
    let b = g.kaiming_uniform(out, r);
    debug_assert_eq!(a.kind(), Kind::Float);
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mersenne_twister_is_the_reference_sequence() {
        // std::mt19937(0) and std::mt19937(5489)'s first outputs (the C++ standard's check:
        // the 10000th output of the default seed is 4123659995)
        let mut g = Mt19937::new(0);
        assert_eq!(
            [g.next_u32(), g.next_u32(), g.next_u32()],
            [2357136044, 2546248239, 3071714933]
        );
        let mut g = Mt19937::new(5489);
        let v = (0..10_000).map(|_| g.next_u32()).last().unwrap();
        assert_eq!(v, 4_123_659_995);
    }

    #[test]
    fn kaiming_values_are_torch_s() {
        // torch 2.11: g = torch.Generator().manual_seed(0);
        // torch.empty((4, 48)).uniform_(-b, b, generator=g) with b = √3·√2/√48, first row
        let (a, b) = projections(0, 4, 32, 48);
        let want = [
            -0.0026469905860722065f64,
            0.18966144323349,
            -0.2909903824329376,
            -0.26019373536109924,
        ];
        let got: Vec<f32> = Vec::try_from(a.get(0).narrow(0, 0, 4)).unwrap();
        assert_eq!(got, want.map(|v| v as f32));
        assert_eq!(b.size(), [32, 4]);
        let bound = (6f64 / 48.0).sqrt() as f32;
        assert!(a.abs().max().double_value(&[]) <= bound as f64);
    }
}
