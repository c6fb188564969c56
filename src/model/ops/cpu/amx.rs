//! bf16 GEMMs with fp32 accumulation on Intel AMX tiles (Sapphire Rapids and later), for `dtype = "bf16"` on
//! the CPU. Weights are converted once into tile panels; activations are rounded to bf16 per call. The tile
//! instructions are emitted with inline assembly, as Rust has no stable AMX intrinsics.
//!
//! C[m, n] = A[m, k] · Wᵀ where W is [n, k]. Each task computes a 32 × 32 block of C with four accumulator
//! tiles (tmm0..tmm3), stepping through k 32 values at a time: two A tiles (tmm4, tmm5: 16 rows × 32 k each)
//! and two B tiles (tmm6, tmm7: 16 pairs of k × 16 columns, in the pair-interleaved layout TDPBF16PS reads).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::vector::{self, bf16_bits as to_bf16};
use super::SharedOut;

/// Rows and columns of one accumulator tile, k values of one step.
const TILE: usize = 16;
const K_STEP: usize = 32;
/// bf16 values in one B tile: 16 pairs of k × 16 columns × 2.
const B_TILE_VALUES: usize = TILE * K_STEP;
/// 32-column blocks one task computes for its row blocks.
const COLUMN_GROUP: usize = 4;
/// k steps computed per visit of a block before moving to the next column block.
const K_CHUNK_STEPS: usize = 8;

/// Whether this CPU has AMX-BF16 and the kernel let this process use the tile registers (checked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    let has_amx = leaf.edx & (1 << 22) != 0 && leaf.edx & (1 << 24) != 0;
    if !has_amx {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only asks the kernel to enable the tile state for this process.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    } == 0;
    if !granted {
        tracing::warn!("the CPU has AMX but the kernel refused the tile state to this process");
    }
    granted
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// A weight matrix W [n, k] in bf16 B-tile panels: for each 16-column block and each 32-value step of k
/// (padded with zeros to a multiple of 32), one tile of 16 k-pairs × 16 columns × 2; n padded to a multiple of
/// 32.
#[derive(Debug)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    n_padded: usize,
    k_steps: usize,
    panels: Vec<u16>,
}

impl PackedWeight {
    /// Packs W [n, k] row-major f32.
    pub fn pack(weight: &[f32], n: usize, k: usize) -> Option<Self> {
        if n == 0 || k == 0 || weight.len() != n * k {
            return None;
        }
        let n_padded = n.div_ceil(2 * TILE) * 2 * TILE;
        let k_steps = k.div_ceil(K_STEP);
        let mut panels = vec![0u16; (n_padded / TILE) * k_steps * B_TILE_VALUES];
        for (tile, panel) in panels.chunks_exact_mut(B_TILE_VALUES).enumerate() {
            let (block, step) = (tile / k_steps, tile % k_steps);
            for pair in 0..TILE {
                for col in 0..TILE {
                    for e in 0..2 {
                        let (row, kk) = (block * TILE + col, step * K_STEP + 2 * pair + e);
                        if row < n && kk < k {
                            panel[pair * 2 * TILE + col * 2 + e] = to_bf16(weight[row * k + kk]);
                        }
                    }
                }
            }
        }
        Some(Self {
            n,
            k,
            n_padded,
            k_steps,
            panels,
        })
    }

    fn tile(&self, block: usize, step: usize) -> *const u16 {
        self.panels[(block * self.k_steps + step) * B_TILE_VALUES..].as_ptr()
    }
}

/// The activations rounded to bf16, rows padded to a multiple of 32 and k to `k_padded` (zeros). Returns
/// (packed rows, padded row count).
fn pack_rows(x: &[f32], rows: usize, k: usize, k_padded: usize) -> (Vec<u16>, usize) {
    let rows_padded = rows.div_ceil(2 * TILE) * 2 * TILE;
    // Every value is written below (rows, their k padding, the padding rows): no zeroing pass first.
    let mut packed: Vec<u16> = Vec::with_capacity(rows_padded * k_padded);
    let spare = &mut packed.spare_capacity_mut()[..rows_padded * k_padded];
    let (real, padding) = spare.split_at_mut(rows * k_padded);
    real.par_chunks_mut(k_padded * 64)
        .zip(x.par_chunks(k * 64))
        .for_each(|(out, rows)| {
            for (out, row) in out.chunks_exact_mut(k_padded).zip(rows.chunks_exact(k)) {
                let (values, tail) = out.split_at_mut(k);
                vector::to_bf16(row, values);
                tail.fill(std::mem::MaybeUninit::new(0));
            }
        });
    padding.fill(std::mem::MaybeUninit::new(0));
    // SAFETY: the loops above initialised all rows_padded × k_padded values.
    unsafe { packed.set_len(rows_padded * k_padded) };
    (packed, rows_padded)
}

/// Tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_tiles_16x64() -> Self {
        let mut config = [0u8; 64];
        config[0] = 1;
        for tile in 0..8 {
            config[16 + 2 * tile] = 64;
            config[48 + tile] = TILE as u8;
        }
        Self(config)
    }
}

/// x·Wᵀ for x [rows, k] f32 → [rows, n] f32, the products in bf16 and the sums in fp32. None when AMX is not
/// usable or the shapes disagree.
pub fn matmul(x: &[f32], rows: usize, weight: &PackedWeight) -> Option<Vec<f32>> {
    let k = weight.k;
    if !available() || rows == 0 || x.len() != rows * k {
        return None;
    }
    let k_padded = weight.k_steps * K_STEP;
    let (a, rows_padded) = pack_rows(x, rows, k, k_padded);
    let n_padded = weight.n_padded;
    let mut out: Vec<f32> = Vec::with_capacity(rows_padded * n_padded);
    // Each task writes only its own 32 × 32 blocks of the output.
    let shared = SharedOut(out.as_mut_ptr());
    let (row_blocks, col_blocks) = (rows_padded / (2 * TILE), n_padded / (2 * TILE));
    // A task: up to COLUMN_GROUP column blocks (whose weight panels then stay in L2) against a run of 32-row
    // blocks. Runs are short enough to give every thread several tasks.
    let groups = col_blocks.div_ceil(COLUMN_GROUP);
    let runs = (4 * rayon::current_num_threads())
        .div_ceil(groups)
        .clamp(1, row_blocks);
    let run_length = row_blocks.div_ceil(runs);
    let config = TileConfig::all_tiles_16x64();
    (0..groups * runs).into_par_iter().for_each(|task| {
        let (group, run) = (task / runs, task % runs);
        let columns = group * COLUMN_GROUP..((group + 1) * COLUMN_GROUP).min(col_blocks);
        let row_range = run * run_length..((run + 1) * run_length).min(row_blocks);
        // SAFETY: AMX is available (checked above) and permitted for this process; the A tiles read 32 rows of
        // k_padded bf16 inside `a`, the B tiles whole panels of `weight`, and the C stores 32 × 32 blocks inside
        // `out`'s capacity (rows_padded × n_padded) that no other task writes.
        unsafe {
            load_tile_config(&config);
            for row_block in row_range {
                let a_rows = a[row_block * 2 * TILE * k_padded..].as_ptr();
                // k in chunks, so the row block's chunk of A (32 rows × 256 values) stays in L1 while every
                // column block of the group reads it.
                for chunk in (0..weight.k_steps).step_by(K_CHUNK_STEPS) {
                    let steps = chunk..(chunk + K_CHUNK_STEPS).min(weight.k_steps);
                    for col_block in columns.clone() {
                        let c = shared.at(row_block * 2 * TILE * n_padded + col_block * 2 * TILE);
                        block_32x32(
                            a_rows,
                            k_padded,
                            weight,
                            col_block,
                            steps.clone(),
                            c,
                            n_padded,
                        );
                    }
                }
            }
        }
    });
    // SAFETY: the tasks stored every 32 × 32 block of the rows_padded × n_padded buffer.
    unsafe { out.set_len(rows_padded * n_padded) };
    Some(compact(out, rows, weight.n, n_padded))
}

/// Drops the padding rows and columns of a [rows_padded, n_padded] result.
fn compact(mut out: Vec<f32>, rows: usize, n: usize, n_padded: usize) -> Vec<f32> {
    if n != n_padded {
        for row in 1..rows {
            out.copy_within(row * n_padded..row * n_padded + n, row * n);
        }
    }
    out.truncate(rows * n);
    out
}

/// One 32 × 32 block of C: rows of `a` (row stride k_padded bf16) times column blocks 2·col_block and
/// 2·col_block + 1 of the weight, stored at `c` with row stride n_padded f32.
///
/// # Safety
/// The CPU must support AMX-BF16 with tile state granted and the tile configuration loaded on this thread, and
/// all pointers must address the extents above.
#[cfg(target_arch = "x86_64")]
unsafe fn block_32x32(
    a: *const u16,
    k_padded: usize,
    weight: &PackedWeight,
    col_block: usize,
    steps: std::ops::Range<usize>,
    c: *mut f32,
    n_padded: usize,
) {
    let a_stride = k_padded * 2;
    let b_stride = 2 * TILE * 2;
    let c_stride = n_padded * 4;
    let a_lower = a.wrapping_add(TILE * k_padded);
    let (c0, c1) = (c, c.add(TILE));
    let (c2, c3) = (c.add(TILE * n_padded), c.add(TILE * n_padded + TILE));
    if steps.start == 0 {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem),
        );
    } else {
        std::arch::asm!(
            "tileloadd tmm0, [{c0} + {c_stride}*1]",
            "tileloadd tmm1, [{c1} + {c_stride}*1]",
            "tileloadd tmm2, [{c2} + {c_stride}*1]",
            "tileloadd tmm3, [{c3} + {c_stride}*1]",
            c0 = in(reg) c0,
            c1 = in(reg) c1,
            c2 = in(reg) c2,
            c3 = in(reg) c3,
            c_stride = in(reg) c_stride,
            options(nostack, readonly),
        );
    }
    for step in steps {
        let (a0, a1) = (a.add(step * K_STEP), a_lower.add(step * K_STEP));
        let (b0, b1) = (
            weight.tile(2 * col_block, step),
            weight.tile(2 * col_block + 1, step),
        );
        std::arch::asm!(
            "tileloadd tmm4, [{a0} + {a_stride}*1]",
            "tileloadd tmm5, [{a1} + {a_stride}*1]",
            "tileloadd tmm6, [{b0} + {b_stride}*1]",
            "tileloadd tmm7, [{b1} + {b_stride}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0,
            a1 = in(reg) a1,
            b0 = in(reg) b0,
            b1 = in(reg) b1,
            a_stride = in(reg) a_stride,
            b_stride = in(reg) b_stride,
            options(nostack, readonly),
        );
    }
    std::arch::asm!(
        "tilestored [{c0} + {c_stride}*1], tmm0",
        "tilestored [{c1} + {c_stride}*1], tmm1",
        "tilestored [{c2} + {c_stride}*1], tmm2",
        "tilestored [{c3} + {c_stride}*1], tmm3",
        c0 = in(reg) c0,
        c1 = in(reg) c1,
        c2 = in(reg) c2,
        c3 = in(reg) c3,
        c_stride = in(reg) c_stride,
        options(nostack),
    );
}

/// Loads the eight-tile configuration on the calling thread.
///
/// # Safety
/// The CPU must support AMX with tile state granted to this process.
#[cfg(target_arch = "x86_64")]
unsafe fn load_tile_config(config: &TileConfig) {
    std::arch::asm!("ldtilecfg [{config}]", config = in(reg) config.0.as_ptr(), options(nostack, readonly));
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn load_tile_config(_: &TileConfig) {}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_32x32(
    _: *const u16,
    _: usize,
    _: &PackedWeight,
    _: usize,
    _: std::ops::Range<usize>,
    _: *mut f32,
    _: usize,
) {
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_value(x: f32) -> f32 {
        f32::from_bits((to_bf16(x) as u32) << 16)
    }

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
    }

    #[test]
    fn tile_gemm_equals_the_product_of_the_rounded_inputs() {
        if !available() {
            eprintln!("skipped: this CPU has no usable AMX-BF16");
            return;
        }
        // Odd sizes on purpose: padding of rows (not a multiple of 32), k (not of 32) and n (not of 32).
        for (rows, k, n) in [(45usize, 70usize, 40usize), (3, 384, 1152), (64, 32, 32)] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 40.0)
                .collect();
            let packed = PackedWeight::pack(&w, n, k).expect("pack");
            let got = matmul(&x, rows, &packed).expect("amx");
            assert_eq!(got.len(), rows * n);
            for r in 0..rows {
                for c in 0..n {
                    let exact: f64 = (0..k)
                        .map(|i| bf16_value(x[r * k + i]) as f64 * bf16_value(w[c * k + i]) as f64)
                        .sum();
                    let scale: f64 = (0..k)
                        .map(|i| (x[r * k + i] as f64 * w[c * k + i] as f64).abs())
                        .sum();
                    // Products of bf16 values are exact in fp32; only the fp32 sums round.
                    assert!(
                        (got[r * n + c] as f64 - exact).abs() <= 1e-6 * scale.max(1.0),
                        "({rows}, {k}, {n}) at ({r}, {c}): {} vs {exact}",
                        got[r * n + c]
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "timing, run by hand in release"]
    fn tile_gemm_speed() {
        let (rows, k, n) = (2048usize, 384usize, 1536usize);
        let x: Vec<f32> = (0..rows * k).map(|i| (i % 17) as f32 / 17.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 13) as f32 / 13.0).collect();
        let packed = PackedWeight::pack(&w, n, k).expect("pack");
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let out = matmul(&x, rows, &packed).expect("amx");
            let elapsed = started.elapsed().as_secs_f64();
            let started = std::time::Instant::now();
            let _ = pack_rows(&x, rows, k, k.div_ceil(32) * 32);
            let pack = started.elapsed().as_secs_f64();
            println!(
                "{rows}x{k}x{n}: {:.1} ms, {:.0} GFLOP/s, packing A {:.2} ms, {}",
                elapsed * 1e3,
                (2 * rows * k * n) as f64 / elapsed / 1e9,
                pack * 1e3,
                out[0]
            );
        }
    }
}
