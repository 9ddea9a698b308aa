//! peft's LoKr on the `lokr` plugin (plugins/lycoris).
use serde_json::Value;

use super::loha::{lycoris_for_loading, rank};
use super::PeftMethod;

/// `peft_type` LOKR.
pub const METHOD: PeftMethod = PeftMethod {
    peft_type: "LOKR",
    plugin: "lokr",
    keys: &[
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        // no effect on linear layers (peft's too): accepted at either value
        "use_effective_conv2d",
        "decompose_both",
        "decompose_factor",
        "rank_dropout_scale",
        "target_modules",
        "init_weights",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
    ],
    // peft 0.21.2's LoKrConfig has no non-null default beyond the implemented keys (its
    // null-default keys: exclude_modules, layers_to_transform, layers_pattern).
    defaults: &[],
    for_loading: lycoris_for_loading,
    layer_tensors: lokr_layer_tensors,
    shape_keys: &["r", "rank_pattern", "decompose_both", "decompose_factor"],
};

/// peft's `lokr.layer.factorization(dimension, factor)`: `(m, n)` with `m · n = dimension`.
/// The same rule as the `lokr` plugin's `shapes::factorization` (a plugin's code cannot be
/// called before the plugin is loaded, and the header check runs first).
fn factorization(dimension: i64, factor: i64) -> (i64, i64) {
    if factor > 0 && dimension % factor == 0 {
        return (factor, dimension / factor);
    }
    let factor = if factor == -1 { dimension } else { factor };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while dimension % new_m != 0 {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    (m.min(n), m.max(n))
}

/// A LoKr layer's saved tensors (peft's keys): `out = a·c` and `in = b·d` split by
/// `factorization` (`decompose_factor`); `W1` `[a, b]` is `lokr_w1`, or `lokr_w1_a` `[a, r]`
/// and `lokr_w1_b` `[r, b]` with `decompose_both` and `r < max(a, b) / 2`; `W2` `[c, d]` is
/// `lokr_w2`, or `lokr_w2_a` / `lokr_w2_b` when `r < max(c, d) / 2`.
pub(crate) fn lokr_layer_tensors(
    config: &Value,
    module: &str,
    out: i64,
    inp: i64,
) -> std::result::Result<Vec<(String, Vec<i64>)>, String> {
    let r = rank(config, module)?;
    let decompose_both = match config.get("decompose_both") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(format!("key `decompose_both` must be true or false, got {other}"))
        }
    };
    let factor = match config.get("decompose_factor") {
        None | Some(Value::Null) => -1,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| format!("key `decompose_factor` must be an integer, got {v}"))?,
    };
    let (out_l, out_k) = factorization(out, factor);
    let (in_m, in_n) = factorization(inp, factor);
    let below_half = |a: i64, b: i64| (r as f64) < a.max(b) as f64 / 2.0;
    let mut tensors = Vec::new();
    for (i, (rows, cols), decompose) in [
        (1, (out_l, in_m), decompose_both && below_half(out_l, in_m)),
        (2, (out_k, in_n), below_half(out_k, in_n)),
    ] {
        if decompose {
            tensors.push((format!("lokr_w{i}_a"), vec![rows, r]));
            tensors.push((format!("lokr_w{i}_b"), vec![r, cols]));
        } else {
            tensors.push((format!("lokr_w{i}"), vec![rows, cols]));
        }
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes_follow_peft_s_factorization() {
        // values printed by peft 0.21.2
        assert_eq!(factorization(176, -1), (11, 16));
        assert_eq!(factorization(64, 16), (16, 4));
        assert_eq!(factorization(127, -1), (1, 127));
        let t = |c: Value| lokr_layer_tensors(&c, "m", 32, 176).unwrap();
        assert_eq!(
            t(json!({"r": 8})),
            [("lokr_w1".to_string(), vec![4, 11]), ("lokr_w2".into(), vec![8, 16])]
        );
        assert_eq!(
            t(json!({"r": 2, "decompose_both": true, "decompose_factor": 16})),
            [
                ("lokr_w1_a".to_string(), vec![16, 2]),
                ("lokr_w1_b".into(), vec![2, 16]),
                ("lokr_w2_a".into(), vec![2, 2]),
                ("lokr_w2_b".into(), vec![2, 11])
            ]
        );
        assert!(lokr_layer_tensors(&json!({"r": 0}), "m", 4, 4).unwrap_err().contains("`r`"));
        // rank_pattern, matched as peft's get_pattern_key
        let c = json!({"r": 8, "rank_pattern": {"down_proj": 2, "q_proj": 0}});
        let t = |m: &str| lokr_layer_tensors(&c, m, 32, 176);
        assert_eq!(
            t("model.layers.0.mlp.down_proj").unwrap()[1],
            ("lokr_w2_a".to_string(), vec![8, 2])
        );
        assert_eq!(
            t("model.layers.0.mlp.xdown_proj").unwrap()[1],
            ("lokr_w2".to_string(), vec![8, 16])
        );
        assert!(t("model.layers.0.self_attn.q_proj").unwrap_err().contains("`rank_pattern`"));
        let c = json!({"r": 8, "rank_pattern": {".*_proj": 2, "down_proj": 4}});
        let e = lokr_layer_tensors(&c, "model.layers.0.mlp.down_proj", 32, 176).unwrap_err();
        assert!(e.contains("`.*_proj` (2)") && e.contains("`down_proj` (4)"), "{e}");
    }
}
