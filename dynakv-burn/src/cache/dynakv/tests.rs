use std::sync::Arc;

use burn::tensor::{Int, Tensor, TensorData};
use dynakv_core::artifact::{Artifact, RopePlacement};
use dynakv_core::policy::{KvKind, RankPolicy};
use dynakv_core::quant::BasisDtype;

use super::*;
use crate::cache::test_support::{artifact, rand4, rope, run, Cycle, Fixed, G};
use crate::cache::{DenseCache, KeepPositions, PrunableCache};
use crate::device::default_device;
use crate::rope::{Rope, RopeStyle};

#[test]
fn full_rank_equals_dense_for_both_placements_and_any_chunking() {
    let device = default_device();
    let rope = rope();
    let (q, k, v) = (
        rand4([1, 4, 40, 4]),
        rand4([1, 2, 40, 4]),
        rand4([1, 2, 40, 4]),
    );
    let mut dense = DenseCache::new(G, rope.clone()).unwrap();
    let want = run(&mut dense, &q, &k, &v, &[40]);
    for placement in [RopePlacement::Pre, RopePlacement::Post] {
        let bases = Arc::new(DynaKvBases::new(&artifact(placement), G, &device).unwrap());
        // one rebuilt prefill, decode steps only, short chunks then a
        // rebuilt chunk over cached tokens
        for chunks in [vec![40], vec![1; 40], vec![3, 1, 6, 30]] {
            let mut c =
                DynaKvCache::new(G, rope.clone(), bases.clone(), Arc::new(Fixed(8))).unwrap();
            let got = run(&mut c, &q, &k, &v, &chunks);
            let diff: f32 = (got - want.clone()).abs().max().into_scalar();
            assert!(diff < 1e-4, "{placement:?} {chunks:?}: {diff}");
        }
    }
}

#[test]
fn host_kernel_decodes_past_a_rope_table_growth() {
    // RoPE tables are built by use: the first chunk builds 512 positions, the
    // long one grows them to 1024, and the host kernel's decode steps after
    // it rotate stored pre-RoPE keys at positions beyond the first table.
    let device = default_device();
    let rope = Rope::new(RopeStyle::Interleaved, 4, 4, 10_000.0, 2048, &device).unwrap();
    let n = 613;
    let (q, k, v) = (
        rand4([1, 4, n, 4]),
        rand4([1, 2, n, 4]),
        rand4([1, 2, n, 4]),
    );
    let chunks = [8, 1, 1, 600, 1, 1, 1];
    let mut dense = DenseCache::new(G, rope.clone()).unwrap();
    let want = run(&mut dense, &q, &k, &v, &chunks);
    let fresh = Rope::new(RopeStyle::Interleaved, 4, 4, 10_000.0, 2048, &device).unwrap();
    let bases = Arc::new(
        DynaKvBases::with_storage(&artifact(RopePlacement::Pre), G, &device, KvStorage::Host)
            .unwrap(),
    );
    let mut c = DynaKvCache::new(G, fresh.clone(), bases, Arc::new(Fixed(8))).unwrap();
    let got = run(&mut c, &q, &k, &v, &chunks);
    assert_eq!(fresh.built_positions(), 1024);
    let diff: f32 = (got - want).abs().max().into_scalar();
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn the_host_kernel_equals_the_tensor_path_at_every_rank_mix() {
    let device = default_device();
    let rope = rope();
    let (q, k, v) = (
        rand4([1, 4, 12, 4]),
        rand4([1, 2, 12, 4]),
        rand4([1, 2, 12, 4]),
    );
    for placement in [RopePlacement::Pre, RopePlacement::Post] {
        let make = |storage| {
            let bases = Arc::new(
                DynaKvBases::with_storage(&artifact(placement), G, &device, storage).unwrap(),
            );
            DynaKvCache::new(G, rope.clone(), bases, Arc::new(Cycle)).unwrap()
        };
        // short chunks (2, 4: host kernel with a causal mask), a long one
        // (5: tensor path over host latents), a decode step
        let chunks = [2, 4, 5, 1];
        let mut dev = make(KvStorage::Device);
        let mut host = make(KvStorage::Host);
        assert!(host.bases.storage == KvStorage::Host && dev.bases.storage == KvStorage::Device);
        let want = run(&mut dev, &q, &k, &v, &chunks);
        let got = run(&mut host, &q, &k, &v, &chunks);
        let diff: f32 = (got - want).abs().max().into_scalar();
        assert!(diff < 1e-5, "{placement:?}: {diff}");
        // Pruning keeps them equal.
        let keep = KeepPositions::Layer(vec![0, 2, 3, 7, 11]);
        for c in [&mut dev, &mut host] {
            c.retain(0, &keep).unwrap();
        }
        let q_last = q.clone().narrow(2, 11, 1);
        let a = dev.attend(0, q_last.clone(), &[11]).unwrap();
        let b = host.attend(0, q_last, &[11]).unwrap();
        let diff: f32 = (a - b).abs().max().into_scalar();
        assert!(diff < 1e-5, "{placement:?} pruned: {diff}");
        assert_eq!(dev.footprint(), host.footprint());
    }
}

/// Keys cycle through the levels; odd tokens keep a key but no value.
#[derive(Debug)]
struct NoOddValues;
impl RankPolicy for NoOddValues {
    fn name(&self) -> &'static str {
        "no-odd-values"
    }
    fn needs_latents(&self) -> bool {
        false
    }
    fn ranks(&self, l: usize, kind: KvKind, lat: &[f32], positions: &[usize]) -> Vec<usize> {
        let cycle = Cycle.ranks(l, kind, lat, positions);
        let no_value = |p: usize| kind == KvKind::Value && p % 2 == 1;
        (positions.iter().zip(cycle))
            .map(|(&p, r)| if no_value(p) { 0 } else { r })
            .collect()
    }
}

#[test]
fn the_rebuilt_prefill_path_equals_scoring_by_bucket() {
    let device = default_device();
    let rope = rope();
    let (q, k, v) = (
        rand4([1, 4, 14, 4]),
        rand4([1, 2, 14, 4]),
        rand4([1, 2, 14, 4]),
    );
    for placement in [RopePlacement::Pre, RopePlacement::Post] {
        for storage in [KvStorage::Device, KvStorage::Host] {
            let bases = Arc::new(
                DynaKvBases::with_storage(&artifact(placement), G, &device, storage).unwrap(),
            );
            let mut c = DynaKvCache::new(G, rope.clone(), bases, Arc::new(NoOddValues)).unwrap();
            // a chunk, a pruning, then a chunk whose queries see cached tokens
            let first: Vec<usize> = (0..9).collect();
            c.append(
                0,
                k.clone().narrow(2, 0, 9),
                v.clone().narrow(2, 0, 9),
                &first,
            )
            .unwrap();
            c.retain(0, &KeepPositions::Layer(vec![0, 1, 2, 4, 5, 7, 8]))
                .unwrap();
            let second: Vec<usize> = (9..14).collect();
            c.append(
                0,
                k.clone().narrow(2, 9, 5),
                v.clone().narrow(2, 9, 5),
                &second,
            )
            .unwrap();
            let q2 = q.clone().narrow(2, 9, 5);
            let a = c.attend_rebuilt(0, q2.clone(), &second).unwrap();
            let b = c.attend_by_bucket(0, q2, &second).unwrap();
            let diff: f32 = (a - b).abs().max().into_scalar();
            assert!(diff < 1e-5, "{placement:?} {storage:?}: {diff}");
        }
    }
}

#[test]
fn cpu_devices_get_host_storage() {
    // The default test backend is Flex unless a GPU feature is on.
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    assert_eq!(KvStorage::for_device(&default_device()), KvStorage::Host);
}

#[test]
fn buckets_track_every_level_across_appends() {
    let device = default_device();
    let rope = rope();
    let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
    let mut c = DynaKvCache::new(G, rope, bases, Arc::new(Cycle)).unwrap();
    let (q, k, v) = (
        rand4([1, 4, 13, 4]),
        rand4([1, 2, 13, 4]),
        rand4([1, 2, 13, 4]),
    );
    let out = run(&mut c, &q, &k, &v, &[5, 1, 1, 6]);
    let vals: Vec<f32> = out.into_data().try_into_vec_as::<f32>().unwrap();
    assert!(vals.iter().all(|x| x.is_finite()));
    let kr = c.ranks(0, KvKind::Key);
    let vr = c.ranks(0, KvKind::Value);
    assert_eq!(kr.len(), 13);
    for (i, &(id, r)) in kr.iter().enumerate() {
        assert_eq!((id, r), (i, 2 * (1 + i % 4)));
        assert_eq!(vr[i], (i, 2 * (1 + (i + 3) % 4)));
    }
    assert_eq!(c.layers[0].buckets[0].len(), 4, "one bucket per level");
    let f = c.footprint();
    let dims: usize = kr.iter().chain(&vr).map(|x| x.1).sum();
    assert_eq!(f.values as usize, dims);
    assert_eq!(f.values_full as usize, 2 * 13 * 8);
    // metadata: one level byte per token and K/V, one position run per layer
    // (the chunks are contiguous); the test appends to layer 0 only
    let run = 3 * std::mem::size_of::<usize>();
    assert_eq!(
        f.metadata_bytes as usize,
        2 * 13 + run,
        "layer 0 holds everything"
    );
    assert_eq!(f.tokens, 13);
    c.reset();
    assert_eq!(c.len(0), 0);
}

/// Keys of odd positions get rank 0 (dropped), values always rank 8.
#[derive(Debug)]
struct DropOddKeys;
impl RankPolicy for DropOddKeys {
    fn name(&self) -> &'static str {
        "drop-odd-keys"
    }
    fn needs_latents(&self) -> bool {
        false
    }
    fn ranks(&self, _l: usize, kind: KvKind, _lat: &[f32], positions: &[usize]) -> Vec<usize> {
        positions
            .iter()
            .map(|&p| {
                if kind == KvKind::Key && p % 2 == 1 {
                    0
                } else {
                    8
                }
            })
            .collect()
    }
}

#[test]
fn a_token_without_a_key_stores_no_value_and_is_not_attended() {
    let device = default_device();
    let rope = rope();
    let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
    let mut c = DynaKvCache::new(G, rope.clone(), bases, Arc::new(DropOddKeys)).unwrap();
    let (q, k, v) = (
        rand4([1, 4, 6, 4]),
        rand4([1, 2, 6, 4]),
        rand4([1, 2, 6, 4]),
    );
    let pos: Vec<usize> = (0..6).collect();
    c.append(0, k.clone(), v.clone(), &pos).unwrap();
    let values: Vec<usize> = c
        .ranks(0, KvKind::Value)
        .iter()
        .map(|&(id, _)| id)
        .collect();
    assert_eq!(values, vec![0, 2, 4]);
    assert_eq!(c.len(0), 3);
    // Attention equals a dense cache holding the even tokens only.
    let q_last = q.narrow(2, 5, 1);
    let got = c.attend(0, q_last.clone(), &[5]).unwrap();
    let mut dense = DenseCache::new(G, rope).unwrap();
    let even = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 2, 4], [3]), &device);
    dense
        .append(0, k.select(2, even.clone()), v.select(2, even), &[0, 2, 4])
        .unwrap();
    let want = dense.attend(0, q_last, &[5]).unwrap();
    let diff: f32 = (got - want).abs().max().into_scalar();
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn a_rank_that_is_not_a_level_is_an_error() {
    let device = default_device();
    let rope = rope();
    let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
    let mut c = DynaKvCache::new(G, rope, bases, Arc::new(Fixed(3))).unwrap();
    let err = c
        .append(0, rand4([1, 2, 2, 4]), rand4([1, 2, 2, 4]), &[0, 1])
        .unwrap_err();
    assert!(err.to_string().contains("not a level"), "{err}");
    let other = CacheGeometry {
        n_kv_heads: 1,
        n_heads: 2,
        ..G
    };
    assert!(DynaKvBases::new(&artifact(RopePlacement::Pre), other, &device).is_err());
}

/// Ranks given per position (K, V), for rebuilding a cache as another left it.
#[derive(Debug)]
struct ByPosition(std::collections::HashMap<usize, [usize; 2]>);
impl RankPolicy for ByPosition {
    fn name(&self) -> &'static str {
        "by-position"
    }
    fn needs_latents(&self) -> bool {
        false
    }
    fn ranks(&self, _l: usize, kind: KvKind, _lat: &[f32], positions: &[usize]) -> Vec<usize> {
        positions.iter().map(|p| self.0[p][kind.index()]).collect()
    }
}

#[test]
fn pruning_under_a_held_budget_lowers_the_kept_ranks_to_it() {
    use dynakv_core::policy::{BudgetHold, EnergyPolicy, EnergyRule, Held};
    let device = default_device();
    let rope = rope();
    let art = artifact(RopePlacement::Pre);
    let bases = Arc::new(DynaKvBases::new(&art, G, &device).unwrap());
    let levels = art.header.levels.clone();
    let energy = EnergyPolicy {
        rule: EnergyRule::Threshold,
        thresholds: vec![[0.05, 0.05]; 2],
        mean_latents: art.mean_latents(),
        levels: levels.clone(),
        shares: vec![],
    };
    let policy = Arc::new(Held::new(Arc::new(energy), BudgetHold::Track, 0.5));
    let mut c = DynaKvCache::new(G, rope.clone(), bases.clone(), policy).unwrap();
    let n = 60;
    let (q, k, v) = (
        rand4([1, 4, 1, 4]),
        rand4([1, 2, n, 4]),
        rand4([1, 2, n, 4]),
    );
    let pos: Vec<usize> = (0..n).collect();
    c.append(0, k.clone(), v.clone(), &pos).unwrap();
    let before = c.ranks(0, KvKind::Key);
    let dims = |r: &[(usize, usize)]| r.iter().map(|x| x.1).sum::<usize>() as f64;
    assert!((dims(&before) / (n * 8) as f64 - 0.5).abs() <= 0.01);
    // Keep the 20 tokens with the highest key ranks, as attention-based
    // pruning tends to.
    let mut order: Vec<(usize, usize)> = before.clone();
    order.sort_by_key(|&(id, r)| (std::cmp::Reverse(r), id));
    let mut keep: Vec<usize> = order[..20].iter().map(|x| x.0).collect();
    keep.sort();
    let was: Vec<usize> = keep.iter().map(|&p| before[p].1).collect();
    c.retain(0, &KeepPositions::Layer(keep.clone())).unwrap();
    let after_k = c.ranks(0, KvKind::Key);
    let after_v = c.ranks(0, KvKind::Value);
    assert_eq!(after_k.iter().map(|x| x.0).collect::<Vec<_>>(), keep);
    let frac = dims(&after_k) / (20 * 8) as f64;
    assert!((frac - 0.5).abs() <= 0.02, "keys after pruning: {frac}");
    assert!(after_k.iter().zip(&was).all(|(a, &b)| a.1 <= b));
    // Values were not chosen for their ranks: lowered where above the
    // target, never raised, so keys and values together are not above it.
    let f = c.footprint();
    assert!(f.retained_kept() <= 0.5 + 0.02, "{f:?}");
    let v_frac = dims(&after_v) / (20 * 8) as f64;
    assert!(v_frac <= 0.5 + 0.02, "values after pruning: {v_frac}");
    assert!(f.retained() < 0.2, "pruning dropped two thirds: {f:?}");
    // The refiled cache attends as one that stored those tokens at those
    // ranks in the first place.
    let map = keep
        .iter()
        .zip(after_k.iter().zip(&after_v))
        .map(|(&p, (a, b))| (p, [a.1, b.1]))
        .collect();
    let mut fresh = DynaKvCache::new(G, rope, bases, Arc::new(ByPosition(map))).unwrap();
    let idx = Tensor::<1, Int>::from_data(
        TensorData::new(keep.iter().map(|&p| p as i64).collect::<Vec<_>>(), [20]),
        &device,
    );
    fresh
        .append(0, k.select(2, idx.clone()), v.select(2, idx), &keep)
        .unwrap();
    let got = c.attend(0, q.clone(), &[n]).unwrap();
    let want = fresh.attend(0, q, &[n]).unwrap();
    let diff: f32 = (got - want).abs().max().into_scalar();
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn f16_bases_attend_as_f32_bases_rounded_to_f16_and_hold_half_the_bytes() {
    let device = default_device();
    let rope = rope();
    let (q, k, v) = (
        rand4([1, 4, 12, 4]),
        rand4([1, 2, 12, 4]),
        rand4([1, 2, 12, 4]),
    );
    let d = G.d_kv();
    for placement in [RopePlacement::Pre, RopePlacement::Post] {
        let art = artifact(placement);
        // the same artifact with encoders and decoders rounded by hand
        let mut rounded = art.clone();
        for b in rounded.bases.iter_mut().flatten() {
            for x in b.enc.iter_mut().chain(b.dec.iter_mut()) {
                *x = half::f16::from_f32(*x).to_f32();
            }
        }
        let make = |art: &Artifact, storage, dtype| {
            let bases = Arc::new(DynaKvBases::with_dtype(art, G, &device, storage, dtype).unwrap());
            DynaKvCache::new(G, rope.clone(), bases, Arc::new(Cycle)).unwrap()
        };
        let chunks = [5, 2, 1, 4];
        let mut want = make(&rounded, KvStorage::Host, BasisDtype::F32);
        let want_out = run(&mut want, &q, &k, &v, &chunks);
        for storage in [KvStorage::Host, KvStorage::Device] {
            let mut c = make(&art, storage, BasisDtype::F16);
            let got = run(&mut c, &q, &k, &v, &chunks);
            let diff: f32 = (got - want_out.clone()).abs().max().into_scalar();
            assert!(diff < 1e-5, "{placement:?} {storage:?}: {diff}");
            // f16 held on the host; f32 tensors (rounded values) on the device
            let width = match storage {
                KvStorage::Host => 2,
                KvStorage::Device => 4,
            };
            let per_layer = width * 4 * d * d + 4 * 2 * d;
            assert_eq!(
                c.footprint().fixed_bytes,
                (G.n_layers * per_layer) as u64,
                "{storage:?}"
            );
        }
        // and differs from the unrounded bases (the test can see rounding)
        let mut exact = make(&art, KvStorage::Host, BasisDtype::F32);
        let exact_out = run(&mut exact, &q, &k, &v, &chunks);
        let diff: f32 = (exact_out - want_out).abs().max().into_scalar();
        assert!(diff > 0.0, "{placement:?}: rounding changed nothing");
    }
    // a precision that disagrees with the bases is refused
    let bases = Arc::new(
        DynaKvBases::with_dtype(
            &artifact(RopePlacement::Pre),
            G,
            &device,
            KvStorage::Host,
            BasisDtype::F32,
        )
        .unwrap(),
    );
    let err = DynaKvCache::with_precision(G, rope, bases, Arc::new(Cycle), Precision::default());
    assert!(err.is_err());
}

/// A windowed DynaKV cache at full rank attends as the windowed dense
/// cache, on every path (rebuilt prefill, scoring by bucket, the host
/// kernel), stays within a window and a half of tokens, and counts the
/// windowed dense cache as its reference.
#[test]
fn a_windowed_cache_at_full_rank_equals_the_windowed_dense_cache() {
    let device = default_device();
    let rope = rope();
    let n = 60;
    let (q, k, v) = (
        rand4([1, 4, n, 4]),
        rand4([1, 2, n, 4]),
        rand4([1, 2, n, 4]),
    );
    let window = 8;
    // a rebuilt prefill past the window, then decode steps and short
    // chunks; a short prefill, decode steps past eviction, then a rebuilt
    // chunk over the kept tokens
    let mut decode_then_long = vec![9, 1, 1, 1, 3];
    decode_then_long.extend([1; 13]);
    decode_then_long.push(32);
    let mut long_then_decode = vec![33];
    long_then_decode.extend([1; 10]);
    long_then_decode.extend([3, 14]);
    for (storage, chunks) in [KvStorage::Host, KvStorage::Device]
        .into_iter()
        .flat_map(|s| [(s, &decode_then_long), (s, &long_then_decode)])
    {
        assert_eq!(chunks.iter().sum::<usize>(), n);
        let mut dense = DenseCache::with_storage(G, rope.clone(), storage)
            .unwrap()
            .with_window(window)
            .unwrap();
        let want = run(&mut dense, &q, &k, &v, chunks);
        for placement in [RopePlacement::Pre, RopePlacement::Post] {
            let bases = Arc::new(
                DynaKvBases::with_storage(&artifact(placement), G, &device, storage).unwrap(),
            );
            let mut c = DynaKvCache::new(G, rope.clone(), bases, Arc::new(Fixed(8)))
                .unwrap()
                .with_window(window)
                .unwrap();
            let got = run(&mut c, &q, &k, &v, chunks);
            let diff: f32 = (got - want.clone()).abs().max().into_scalar();
            assert!(diff < 1e-4, "{storage:?} {placement:?}: {diff}");
            assert_eq!(c.len(0), dense.len(0), "{storage:?} {placement:?}");
            assert!(c.len(0) <= window + window.div_ceil(2) + 32);
            let (f, fd) = (c.footprint(), dense.footprint());
            assert_eq!(f.values_full, fd.values_full);
            assert_eq!(f.values, fd.values);
        }
    }
    let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
    // decode steps alone stay within a window and a half, metadata too
    let mut c = DynaKvCache::new(G, rope.clone(), bases.clone(), Arc::new(Fixed(4)))
        .unwrap()
        .with_window(window)
        .unwrap();
    run(&mut c, &q, &k, &v, &[1; 60]);
    assert!(c.len(0) <= window + window.div_ceil(2), "{}", c.len(0));
    assert!(c.layers[0].codes[0].len() <= window + window.div_ceil(2));
    assert!(DynaKvCache::new(G, rope, bases, Arc::new(Fixed(4)))
        .unwrap()
        .with_window(0)
        .is_err());
}

/// A prompt held whole and then pruned with no whole tokens ends with the
/// ranks it would have had ranked on arrival and pruned, under a held
/// budget too: the controller plans over the whole prompt, not only over
/// the kept tokens (measured: planning over the kept tokens alone skewed
/// its window and doubled PPL at energy 0.70).
#[test]
fn a_held_prompt_ends_with_the_ranks_of_one_ranked_on_arrival() {
    use dynakv_core::policy::{BudgetHold, EnergyPolicy, EnergyRule, Held};
    let device = default_device();
    let art = artifact(RopePlacement::Pre);
    let bases = Arc::new(DynaKvBases::new(&art, G, &device).unwrap());
    let energy = EnergyPolicy {
        rule: EnergyRule::Threshold,
        thresholds: vec![[0.05, 0.05]; 2],
        mean_latents: art.mean_latents(),
        levels: art.header.levels.clone(),
        shares: vec![],
    };
    let policy = Arc::new(Held::new(Arc::new(energy), BudgetHold::Track, 0.5));
    let n = 60;
    let (k, v) = (rand4([1, 2, n, 4]), rand4([1, 2, n, 4]));
    let pos: Vec<usize> = (0..n).collect();
    let keep = KeepPositions::Layer((0..n).filter(|p| p % 3 != 1).collect());
    let mut arrival = DynaKvCache::new(G, rope(), bases.clone(), policy.clone()).unwrap();
    arrival.append(0, k.clone(), v.clone(), &pos).unwrap();
    arrival.retain(0, &keep).unwrap();
    let mut held = DynaKvCache::new(G, rope(), bases, policy).unwrap();
    held.hold_prompt_whole().unwrap();
    held.append(0, k, v, &pos).unwrap();
    assert!(held.ranks(0, KvKind::Key).iter().all(|&(_, r)| r == 8));
    // a plain retain would lose the held prompt's ranks: refused
    assert!(held.clone().retain(0, &keep).is_err());
    held.retain_tiered(0, &keep, &[]).unwrap();
    for kind in [KvKind::Key, KvKind::Value] {
        assert_eq!(held.ranks(0, kind), arrival.ranks(0, kind), "{kind:?}");
    }
    assert_eq!(held.footprint().retained(), arrival.footprint().retained());
}

/// Decode steps over int8 latents (the default) give the same bits on any
/// number of threads: the value sums of a step's token chunks are added in
/// their order (`math::sum_in_order`), not in the order threads finish
/// them, so a result does not depend on scheduling (8-bit latents rounded
/// from the outputs' last bits turned such differences into different
/// perplexities between identical runs).
#[test]
fn decode_steps_give_the_same_bits_on_any_number_of_threads() {
    let device = default_device();
    let n = 5 * crate::host::math::CHUNK + 7;
    let (q, k, v) = (
        rand4([1, 4, n, 4]),
        rand4([1, 2, n, 4]),
        rand4([1, 2, n, 4]),
    );
    let bases = Arc::new(
        DynaKvBases::with_storage(&artifact(RopePlacement::Pre), G, &device, KvStorage::Host)
            .unwrap(),
    );
    let chunks = [n - 3, 1, 1, 1];
    let rope = Rope::new(RopeStyle::Interleaved, 4, 4, 10_000.0, 1024, &device).unwrap();
    let on = |threads: usize| -> Vec<u32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let precision = Precision {
                basis: bases.dtype(),
                ..Precision::default()
            };
            let mut c = DynaKvCache::with_precision(
                G,
                rope.clone(),
                bases.clone(),
                Arc::new(Cycle),
                precision,
            )
            .unwrap();
            let out = run(&mut c, &q, &k, &v, &chunks).narrow(2, n - 3, 3);
            let out = out.into_data().try_to_vec::<f32>().unwrap();
            out.iter().map(|x| x.to_bits()).collect()
        })
    };
    let one = on(1);
    for threads in [2, 3, 4] {
        assert!(on(threads) == one, "{threads} threads");
    }
}
