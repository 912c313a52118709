//! SnapKV on plain tensors: which prompt tokens does the end of the prompt
//! look at? Keys of a 200-token prompt are random except for three "facts"
//! that the last queries point at; SnapKV keeps them and the window.
//!
//! `cargo run -p dynakv-snapkv --example select_tokens`

use burn::tensor::{Distribution, Tensor, TensorData};
use dynakv_snapkv::{score, snapkv, GqaScores, SnapKvError, SnapKvPreset, SnapKvSpec};

fn main() -> Result<(), SnapKvError> {
    let device = burn::tensor::Device::default();
    device.seed(3);
    let (n_heads, n_kv_heads, head_dim, prompt) = (4, 2, 32, 200);
    // Keys `[1, H_kv, L, D]` (RoPE already applied, as a model's cache holds them).
    let mut keys: Vec<f32> = Tensor::<4>::random(
        [1, n_kv_heads, prompt, head_dim],
        Distribution::Normal(0.0, 1.0),
        &device,
    )
    .into_data()
    .try_into_vec_as::<f32>()?;
    // Plant three facts: tokens whose keys align with one direction.
    let facts = [17usize, 90, 141];
    for h in 0..n_kv_heads {
        for &t in &facts {
            let row = &mut keys[(h * prompt + t) * head_dim..][..head_dim];
            row.iter_mut().for_each(|x| *x = 3.0);
        }
    }
    let keys = Tensor::<4>::from_data(
        TensorData::new(keys, [1, n_kv_heads, prompt, head_dim]),
        &device,
    );

    // The spec a user writes: our `recall` preset, keep a quarter of the prompt.
    let spec: SnapKvSpec = "recall@0.75".parse()?;
    let config = spec.config(false)?;
    // The last `window` queries `[1, H, w, D]`, all pointing at the facts' direction.
    let w = config.window;
    let q_window = Tensor::<4>::random(
        [1, n_heads, w, head_dim],
        Distribution::Normal(0.0, 0.3),
        &device,
    ) + 1.0;

    // Scores of the tokens before the window, per KV head (kvpress's granularity).
    let scores = score(q_window.clone(), keys.clone(), &config)?;
    println!("{} rows of {} scored tokens", scores.rows, scores.prefix);

    // The selection: top tokens outside the window, plus the whole window.
    let selection = snapkv(q_window.clone(), keys.clone(), &config)?;
    for (head, kept) in selection.kept.iter().enumerate() {
        let found: Vec<usize> = facts.iter().copied().filter(|t| kept.contains(t)).collect();
        let window_whole = (prompt - w..prompt).all(|t| kept.contains(&t));
        println!(
            "kv head {head}: kept {} of {prompt}, facts kept {found:?}, window whole: {window_whole}",
            kept.len()
        );
    }

    // One token set for the whole layer (what DynaKV's joint basis needs).
    let layer = SnapKvSpec {
        gqa: Some(GqaScores::LayerMax),
        ..spec
    };
    let selection = snapkv(q_window, keys, &layer.config(true)?)?;
    println!(
        "layer-max: one set of {} tokens ({} preset, {} of the prompt removed)",
        selection.kept[0].len(),
        SnapKvPreset::Recall,
        0.75
    );
    Ok(())
}
