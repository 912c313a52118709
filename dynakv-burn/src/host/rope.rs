//! RoPE on the host: the same tables as [`Rope`](crate::Rope)'s, for
//! kernels that rotate row by row, and the same angles rebuilt from two
//! small tables for kernels that rotate every cached token.

use crate::rope::RopeStyle;

/// RoPE tables on the host, the same numbers as [`Rope`]'s, for kernels that
/// rotate row by row.
///
/// # Shapes
/// `cos`, `sin`: `[max_positions, head_dim]` row-major, each pair's value at
/// both its coordinates; `fine`: `[FINE, 2, head_dim]`, the cos and sin rows
/// of positions `0..FINE`; `coarse`: `[ceil(max_positions / FINE), 2,
/// head_dim]`, those of positions `0, FINE, 2 FINE, ...`.
#[derive(Debug)]
pub(crate) struct HostRope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    head_dim: usize,
    n_rot: usize,
    style: RopeStyle,
    fine: Vec<f32>,
    coarse: Vec<f32>,
}

/// Positions a row of [`HostRope`]'s coarse table stands for.
///
/// Why: a pre-RoPE DynaKV key is rotated on every decode step, so the
/// kernels that rebuild keys read a rotation for every cached token and
/// layer. Full rows (512 bytes a position on SmolLM2, 2 KB on Gemma 3) are
/// megabytes at long context, read in position order with gaps: a profile
/// of the int8 rebuild at 8k put about half of its samples on those loads.
/// `FINE + positions / FINE` rows (192 at 8,192 positions) stay in the
/// cache, and the angle addition costs four products a coordinate.
pub(crate) const FINE: usize = 64;

impl HostRope {
    /// Tables `[max_positions, head_dim]` row-major, as [`Rope`](crate::Rope) builds them.
    pub(crate) fn new(
        cos: Vec<f32>,
        sin: Vec<f32>,
        head_dim: usize,
        n_rot: usize,
        style: RopeStyle,
    ) -> Self {
        let positions = cos.len().checked_div(head_dim).unwrap_or(0);
        // the cos and sin rows of `p`, back to back
        let pair = |p: usize| {
            let row = p * head_dim..(p + 1) * head_dim;
            cos[row.clone()].iter().chain(&sin[row]).copied()
        };
        let fine = (0..FINE.min(positions)).flat_map(pair).collect();
        let coarse = (0..positions).step_by(FINE).flat_map(pair).collect();
        Self {
            cos,
            sin,
            head_dim,
            n_rot,
            style,
            fine,
            coarse,
        }
    }

    /// The cos and sin rows of `pos` (`[head_dim]` each). The caller checks
    /// `pos` against the table, as for [`Self::rotate`].
    #[inline(always)]
    pub(crate) fn row(&self, pos: usize) -> (&[f32], &[f32]) {
        let row = pos * self.head_dim;
        (
            &self.cos[row..row + self.head_dim],
            &self.sin[row..row + self.head_dim],
        )
    }

    /// The cos and sin rows of `pos` (`out`: `[2, head_dim]`, cos then sin)
    /// from the small tables: the angle of `pos` is that of its multiple of
    /// [`FINE`] plus that of the rest, so `cos = cos_c cos_f - sin_c sin_f`
    /// and `sin = sin_c cos_f + cos_c sin_f`. Within a few f32 steps of
    /// [`Self::row`]'s values (equal below [`FINE`] and at its multiples,
    /// where one factor is exactly 1 and 0). The caller checks `pos`
    /// against the table, as for [`Self::row`].
    #[inline(always)]
    pub(crate) fn row_into(&self, pos: usize, out: &mut [f32]) {
        let dh = self.head_dim;
        let (c, f) = ((pos / FINE) * 2 * dh, (pos % FINE) * 2 * dh);
        let (cc, cs) = self.coarse[c..c + 2 * dh].split_at(dh);
        let (fc, fs) = self.fine[f..f + 2 * dh].split_at(dh);
        let (oc, os) = out[..2 * dh].split_at_mut(dh);
        let factors = cc.iter().zip(cs).zip(fc.iter().zip(fs));
        for ((c, s), ((&cc, &cs), (&fc, &fs))) in oc.iter_mut().zip(os).zip(factors) {
            *c = cc * fc - cs * fs;
            *s = cs * fc + cc * fs;
        }
    }

    /// How pairs are laid out.
    pub(crate) fn style(&self) -> RopeStyle {
        self.style
    }

    /// Whether these tables are for heads of `head_dim` values and rotate
    /// every coordinate (no partial rotary dimensions).
    pub(crate) fn rotates_all(&self, head_dim: usize) -> bool {
        self.head_dim == head_dim && self.n_rot == head_dim
    }

    /// Rotates one head's vector in place. The caller checks `pos` against
    /// the table (the tensor path already rejected out-of-range positions on
    /// append).
    #[inline(always)]
    pub(crate) fn rotate(&self, x: &mut [f32], pos: usize) {
        let (c, s) = self.row(pos);
        match self.style {
            RopeStyle::Interleaved => {
                for i in (0..self.n_rot).step_by(2) {
                    let (a, b) = (x[i], x[i + 1]);
                    x[i] = a * c[i] - b * s[i];
                    x[i + 1] = b * c[i + 1] + a * s[i + 1];
                }
            }
            RopeStyle::SplitHalves => {
                let h = self.n_rot / 2;
                for i in 0..h {
                    let (a, b) = (x[i], x[i + h]);
                    x[i] = a * c[i] - b * s[i];
                    x[i + h] = b * c[i + h] + a * s[i + h];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::default_device;
    use crate::Rope;

    #[test]
    fn rows_from_the_small_tables_equal_the_full_rows() {
        let device = default_device();
        for (style, dh, n_rot, base) in [
            (RopeStyle::Interleaved, 64, 64, 100_000.0),
            (RopeStyle::SplitHalves, 32, 32, 10_000.0),
            // partial rotary dimensions: the rest stays at cos 1, sin 0
            (RopeStyle::Interleaved, 16, 8, 10_000.0),
        ] {
            let rope = Rope::new(style, dh, n_rot, base, 1 << 14, &device).unwrap();
            let host = rope.host(9_000).unwrap();
            let mut out = vec![f32::NAN; 2 * dh];
            for pos in (0..9_000).step_by(7).chain([63, 64, 65, 8_191, 8_999]) {
                host.row_into(pos, &mut out);
                let (c, s) = host.row(pos);
                let exact = pos < FINE || pos.is_multiple_of(FINE);
                for (got, want) in out.iter().zip(c.iter().chain(s)) {
                    if exact {
                        assert_eq!(got, want, "pos {pos}");
                    } else {
                        // a few f32 steps of numbers in [-1, 1]
                        assert!((got - want).abs() <= 4e-7, "pos {pos}: {got} vs {want}");
                    }
                }
            }
        }
    }
}
