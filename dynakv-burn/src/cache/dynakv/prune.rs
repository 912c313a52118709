//! Pruning a DynaKV cache: dropped tokens leave their rank buckets, and a
//! held budget lowers the kept tokens' ranks back to it.

use burn::tensor::{Tensor, TensorData};
use dynakv_core::policy::KvKind;

use super::buckets::{padded_host_rows, padded_latents, NewLatents};
use super::DynaKvCache;
use crate::cache::{host_rows, KeepPositions, KvStorage, PrunableCache};
use crate::error::CacheError;

impl PrunableCache for DynaKvCache {
    fn per_kv_head(&self) -> bool {
        false
    }

    /// Drops every token not kept from the rank buckets of both K and V.
    fn retain(&mut self, layer: usize, keep: &KeepPositions) -> Result<(), CacheError> {
        self.geometry.check_layer(layer)?;
        if self.holds_prompt(layer) {
            return Err(CacheError::Config(
                "this DynaKV cache holds its prompt whole until a tiered retain".into(),
            ));
        }
        self.drop_unkept(layer, keep)?;
        self.rerank_to_budget(layer)
    }

    fn hold_prompt_whole(&mut self) -> Result<(), CacheError> {
        self.hold_prompts();
        Ok(())
    }

    fn retain_tiered(
        &mut self,
        layer: usize,
        keep: &KeepPositions,
        whole: &[usize],
    ) -> Result<(), CacheError> {
        self.geometry.check_layer(layer)?;
        self.rank_held_prompt(layer, keep, whole)
    }
}

/// The positions a one-set-per-layer selection keeps (the joint basis has
/// no per-head selection).
pub(super) fn layer_keep_set(
    keep: &KeepPositions,
) -> Result<std::collections::HashSet<usize>, CacheError> {
    match keep {
        KeepPositions::Layer(keep) => Ok(keep.iter().copied().collect()),
        KeepPositions::PerKvHead(_) => Err(CacheError::Config(
            "DynaKvCache stores all KV heads of a token together (joint basis): \
             it needs one token set per layer"
                .into(),
        )),
    }
}

impl DynaKvCache {
    /// Drops every token of `layer` whose position is not kept from the
    /// rank buckets of both K and V (their level codes become 0).
    pub(super) fn drop_unkept(
        &mut self,
        layer: usize,
        keep: &KeepPositions,
    ) -> Result<(), CacheError> {
        let keep = layer_keep_set(keep)?;
        let levels = &self.bases.levels;
        let store = &mut self.layers[layer];
        for k in 0..2 {
            let index = store.index(k, levels);
            for (b, ix) in store.buckets[k].iter_mut().zip(&index) {
                let rows: Vec<usize> = (0..ix.positions.len())
                    .filter(|&i| keep.contains(&ix.positions[i]))
                    .collect();
                if rows.len() == ix.positions.len() {
                    continue;
                }
                store.dims[k] -= b.rank * (ix.positions.len() - rows.len());
                for (i, &id) in ix.ids.iter().enumerate() {
                    if !keep.contains(&ix.positions[i]) {
                        store.codes[k][id] = 0;
                    }
                }
                b.keep_rows(&rows);
            }
            store.buckets[k].retain(|b| b.len() > 0);
        }
        Ok(())
    }

    /// With a budget controller: the kept tokens (those attention needs most,
    /// which the policy had given more dimensions) are lowered back to the
    /// layer's target by truncating latents, exact for every rank is a
    /// prefix of the basis; a kind already at its target is left as stored.
    pub(super) fn rerank_to_budget(&mut self, layer: usize) -> Result<(), CacheError> {
        if self.controller.is_none() {
            return Ok(());
        }
        let levels = self.bases.levels.clone();
        let d = self.bases.d_kv;
        let device = self.rope.device();
        for kind in [KvKind::Key, KvKind::Value] {
            let k = kind.index();
            let store = &self.layers[layer];
            let n_ids = store.next_id;
            let ids: Vec<usize> = (0..n_ids).filter(|&id| store.codes[k][id] != 0).collect();
            let ranks: Vec<usize> = ids
                .iter()
                .map(|&id| levels.as_slice()[store.codes[k][id] as usize - 1])
                .collect();
            let mut slot_of = vec![usize::MAX; n_ids];
            for (j, &id) in ids.iter().enumerate() {
                slot_of[id] = j;
            }
            let index = store.index(k, &levels);
            let Some(controller) = self.controller.as_mut() else {
                return Ok(());
            };
            // The stored latents, decoded only when ranks must come down.
            let mut host = Vec::new();
            let (filled, buckets, n) = (&mut host, &store.buckets[k], ids.len());
            let (index, slot_of, dev) = (&index, &slot_of, &device);
            let latents = move || -> Result<&[f32], CacheError> {
                let rows = filled;
                *rows = match padded_host_rows(buckets, index, slot_of, n, d) {
                    Some(rows) => rows,
                    None => host_rows(&padded_latents(buckets, index, slot_of, n, d, dev))?,
                };
                Ok(rows)
            };
            let Some(new) = controller.after_prune(&*self.policy, layer, kind, &ranks, latents)?
            else {
                continue;
            };
            // Refile every token of this kind at its new rank (pruned ids
            // stay empty: rank 0).
            let mut all = vec![0f32; n_ids * d];
            let mut all_ranks = vec![0usize; n_ids];
            for (j, &id) in ids.iter().enumerate() {
                all[id * d..(id + 1) * d].copy_from_slice(&host[j * d..(j + 1) * d]);
                all_ranks[id] = new[j];
            }
            self.refile(layer, kind, all, &all_ranks)?;
        }
        Ok(())
    }

    /// Files every token id of one layer and kind anew: `all` holds each
    /// id's latent row (`[next_id, d]`, row-major), `ranks` its new rank (0:
    /// nothing stored). Exact for ranks at or below the stored ones: every
    /// rank is a prefix of the basis.
    pub(super) fn refile(
        &mut self,
        layer: usize,
        kind: KvKind,
        all: Vec<f32>,
        ranks: &[usize],
    ) -> Result<(), CacheError> {
        let (d, k) = (self.bases.d_kv, kind.index());
        let device = self.rope.device();
        let store = &mut self.layers[layer];
        store.buckets[k].clear();
        store.codes[k].clear();
        store.dims[k] = 0;
        match self.bases.storage {
            KvStorage::Host => self.store(layer, kind, NewLatents::Host(&all), ranks),
            KvStorage::Device => {
                let lat = Tensor::from_data(TensorData::new(all, [ranks.len(), d]), &device);
                self.store(layer, kind, NewLatents::Device(Box::new(lat)), ranks)
            }
        }
    }

    /// Every stored token of one layer and kind: ids ascending, and their
    /// latents zero-padded to full width (`[ids.len(), d]`, row-major).
    pub(super) fn stored_rows(
        &self,
        layer: usize,
        kind: KvKind,
    ) -> Result<(Vec<usize>, Vec<f32>), CacheError> {
        let k = kind.index();
        let store = &self.layers[layer];
        let d = self.bases.d_kv;
        let ids: Vec<usize> = (0..store.next_id)
            .filter(|&id| store.codes[k][id] != 0)
            .collect();
        let mut slot_of = vec![usize::MAX; store.next_id];
        for (j, &id) in ids.iter().enumerate() {
            slot_of[id] = j;
        }
        let index = store.index(k, &self.bases.levels);
        let rows = match padded_host_rows(&store.buckets[k], &index, &slot_of, ids.len(), d) {
            Some(rows) => rows,
            None => host_rows(&padded_latents(
                &store.buckets[k],
                &index,
                &slot_of,
                ids.len(),
                d,
                &self.rope.device(),
            ))?,
        };
        Ok((ids, rows))
    }
}
