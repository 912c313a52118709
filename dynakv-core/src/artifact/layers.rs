//! An artifact's layers taken apart and put together.
//!
//! Why: a model with sliding-window layers (Gemma 3) runs one cache per
//! group of layers that share a window and a RoPE base. An artifact that
//! covers every layer of such a model is calibrated one group at a time
//! ([`Artifact::join_layers`]) and handed to each group's cache as the
//! artifact of that group alone ([`Artifact::select_layers`]), so bases,
//! policies and routers stay per-cache as they are on a uniform model.

use super::{invalid, Artifact};
use crate::error::CoreError;

impl Artifact {
    /// The artifact of some of its layers, in the order given: bases,
    /// policy sample, routers and per-layer router shares of each; the
    /// header's layer count becomes `layers.len()`.
    ///
    /// # Errors
    /// An empty list, or a layer out of range.
    pub fn select_layers(&self, layers: &[usize]) -> Result<Artifact, CoreError> {
        let n = self.header.model.n_layers;
        if layers.is_empty() {
            return Err(invalid("no layers selected from the artifact".into()));
        }
        if let Some(&l) = layers.iter().find(|&&l| l >= n) {
            return Err(invalid(format!(
                "layer {l} selected from an artifact of {n} layers"
            )));
        }
        let pick = |what: &str, len: usize| -> Result<(), CoreError> {
            match len {
                0 => Ok(()),
                len if len == n => Ok(()),
                len => Err(invalid(format!(
                    "the artifact holds {what} of {len} layers for n_layers = {n}"
                ))),
            }
        };
        if self.bases.len() != n {
            return Err(invalid(format!(
                "the artifact holds bases of {} layers for n_layers = {n}",
                self.bases.len()
            )));
        }
        pick("a policy sample", self.sample.rel.len())?;
        pick("routers", self.routers.as_ref().map_or(0, Vec::len))?;
        let mut header = self.header.clone();
        header.model.n_layers = layers.len();
        if let Some(r) = &mut header.router {
            pick("router shares", r.shares.len())?;
            if !r.shares.is_empty() {
                r.shares = layers.iter().map(|&l| r.shares[l]).collect();
            }
        }
        let mut sample = self.sample.clone();
        sample.rel = chosen(&self.sample.rel, layers);
        Ok(Artifact {
            header,
            bases: chosen(&self.bases, layers),
            sample,
            routers: self.routers.as_deref().map(|r| chosen(r, layers)),
        })
    }

    /// One artifact of `n_layers` layers from parts that each cover some of
    /// them (`(model layers of the part, in order; the part)`), every layer
    /// exactly once. The parts must agree on everything but their layers
    /// (model, basis kind, RoPE placement, levels, policy sample
    /// positions); the header is the first part's, with the smallest
    /// calibration token count of any part (the tokens every layer's
    /// statistics saw). Parts with routers are refused: a router's
    /// threshold is fitted over the layers it was trained with.
    pub fn join_layers(
        parts: &[(&[usize], &Artifact)],
        n_layers: usize,
    ) -> Result<Artifact, CoreError> {
        let Some((_, first)) = parts.first() else {
            return Err(invalid("no artifacts to join".into()));
        };
        let mut slot: Vec<Option<(usize, usize)>> = vec![None; n_layers];
        for (p, (layers, part)) in parts.iter().enumerate() {
            if part.header.router.is_some() {
                return Err(invalid(
                    "an artifact with a router cannot be joined with others".into(),
                ));
            }
            if layers.len() != part.header.model.n_layers {
                return Err(invalid(format!(
                    "part {p} covers {} layers and holds {}",
                    layers.len(),
                    part.header.model.n_layers
                )));
            }
            let (a, b) = (&part.header, &first.header);
            let same_model = a.model.architecture == b.model.architecture
                && a.model.file_sha256 == b.model.file_sha256
                && (a.model.n_heads, a.model.n_kv_heads, a.model.head_dim)
                    == (b.model.n_heads, b.model.n_kv_heads, b.model.head_dim);
            if !same_model
                || a.basis != b.basis
                || a.rope != b.rope
                || a.levels != b.levels
                || a.sample_positions != b.sample_positions
                || a.format_version != b.format_version
            {
                return Err(invalid(format!(
                    "part {p} was calibrated differently from part 0 (model, basis, RoPE \
                     placement, levels or sample)"
                )));
            }
            for (i, &l) in layers.iter().enumerate() {
                match slot.get_mut(l) {
                    Some(s @ None) => *s = Some((p, i)),
                    Some(Some(_)) => return Err(invalid(format!("layer {l} given twice"))),
                    None => {
                        return Err(invalid(format!("layer {l} of a join of {n_layers} layers")))
                    }
                }
            }
        }
        let slot = slot
            .into_iter()
            .enumerate()
            .map(|(l, s)| s.ok_or_else(|| invalid(format!("layer {l} is in no part"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut header = first.header.clone();
        header.model.n_layers = n_layers;
        header.calib_tokens = parts
            .iter()
            .map(|(_, a)| a.header.calib_tokens)
            .min()
            .unwrap_or(0);
        let mut sample = first.sample.clone();
        sample.rel = if parts.iter().all(|(_, a)| a.sample.rel.is_empty()) {
            Vec::new()
        } else {
            let mut rel = Vec::with_capacity(n_layers);
            for &(p, i) in &slot {
                rel.push(parts[p].1.sample.rel.get(i).cloned().ok_or_else(|| {
                    invalid(format!("part {p} has no policy sample for its layer {i}"))
                })?);
            }
            rel
        };
        let mut bases = Vec::with_capacity(n_layers);
        for &(p, i) in &slot {
            bases.push(
                parts[p]
                    .1
                    .bases
                    .get(i)
                    .cloned()
                    .ok_or_else(|| invalid(format!("part {p} has no bases for its layer {i}")))?,
            );
        }
        Ok(Artifact {
            header,
            bases,
            sample,
            routers: None,
        })
    }
}

/// The entries of `layers` (checked in range), or nothing of nothing (an
/// artifact built in memory may hold no policy sample).
fn chosen<T: Clone>(v: &[T], layers: &[usize]) -> Vec<T> {
    if v.is_empty() {
        Vec::new()
    } else {
        layers.iter().filter_map(|&l| v.get(l).cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::artifact::tests::tiny;
    use crate::artifact::Artifact;

    /// A three-layer artifact whose layers differ (each basis mean shifted
    /// by its layer), without a router.
    fn three() -> Artifact {
        let (mut a, _, _) = tiny();
        a.header.router = None;
        a.routers = None;
        a.header.model.n_layers = 3;
        let layer = |l: usize| {
            let mut pair = a.bases[0].clone();
            pair.iter_mut().for_each(|b| b.mean[0] = l as f32);
            pair
        };
        let bases = (0..3).map(layer).collect();
        let rel = vec![a.sample.rel[0].clone(); 3];
        a.bases = bases;
        a.sample.rel = rel;
        a.validate().unwrap();
        a
    }

    #[test]
    fn selecting_then_joining_layers_gives_the_artifact_back() {
        let a = three();
        let local = a.select_layers(&[0, 2]).unwrap();
        let global = a.select_layers(&[1]).unwrap();
        assert_eq!(local.header.model.n_layers, 2);
        assert_eq!(local.bases[1][0].mean[0], 2.0);
        assert_eq!(global.bases[0][1].mean[0], 1.0);
        let back = Artifact::join_layers(&[(&[1], &global), (&[0, 2], &local)], 3).unwrap();
        assert_eq!(back.bases, a.bases);
        assert_eq!(back.sample.rel, a.sample.rel);
        assert_eq!(back.header.model, a.header.model);
        assert_eq!(back.header.calib_tokens, a.header.calib_tokens);
    }

    #[test]
    fn bad_selections_and_joins_are_refused() {
        let a = three();
        assert!(a.select_layers(&[]).is_err());
        assert!(a.select_layers(&[3]).is_err());
        let one = a.select_layers(&[0]).unwrap();
        let two = a.select_layers(&[1, 2]).unwrap();
        // a layer twice, a layer missing, a layer beyond the model, a part
        // of another size than it says
        assert!(Artifact::join_layers(&[(&[0], &one), (&[0, 2], &two)], 3).is_err());
        assert!(Artifact::join_layers(&[(&[0], &one)], 3).is_err());
        assert!(Artifact::join_layers(&[(&[0], &one), (&[1, 3], &two)], 3).is_err());
        assert!(Artifact::join_layers(&[(&[0, 1], &one), (&[2], &two)], 3).is_err());
        // parts calibrated differently, or holding a router
        let mut other = two.clone();
        other.header.model.file_sha256 = "cd".into();
        assert!(Artifact::join_layers(&[(&[0], &one), (&[1, 2], &other)], 3).is_err());
        let (routed, _, _) = tiny();
        assert!(Artifact::join_layers(&[(&[0], &routed), (&[1, 2], &two)], 3).is_err());
        // a router's shares follow the layers selected
        let mut r = routed.clone();
        r.header.model.n_layers = 1;
        assert_eq!(
            r.select_layers(&[0]).unwrap().header.router.unwrap().shares,
            vec![[0.25, 0.375]]
        );
    }
}
