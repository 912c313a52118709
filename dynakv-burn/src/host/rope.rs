//! RoPE on the host: the same tables as [`Rope`](crate::Rope)'s, for
//! kernels that rotate row by row.

use crate::rope::RopeStyle;

/// RoPE tables on the host, the same numbers as [`Rope`]'s, for kernels that
/// rotate row by row.
///
/// # Shapes
/// `cos`, `sin`: `[max_positions, head_dim]` row-major, each pair's value at
/// both its coordinates.
#[derive(Debug)]
pub(crate) struct HostRope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    head_dim: usize,
    n_rot: usize,
    style: RopeStyle,
}

impl HostRope {
    /// Tables `[max_positions, head_dim]` row-major, as [`Rope`](crate::Rope) builds them.
    pub(crate) fn new(
        cos: Vec<f32>,
        sin: Vec<f32>,
        head_dim: usize,
        n_rot: usize,
        style: RopeStyle,
    ) -> Self {
        Self {
            cos,
            sin,
            head_dim,
            n_rot,
            style,
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
