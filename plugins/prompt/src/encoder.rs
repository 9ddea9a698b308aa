//! The tensors of a prompt-learning adapter and their forward: peft's `PromptEmbedding`
//! (a table), `PromptEncoder` (a table through an MLP, or a bidirectional LSTM and an MLP
//! head) and `PrefixEncoder` (a table, or a table through a two-layer tanh MLP). Trainable
//! tensors carry peft's parameter names (`prompt_encoder.default.mlp_head.0.weight`), f32 on
//! the word embeddings' device; initialisations are torch's defaults (`nn.Embedding`: N(0, 1);
//! `nn.Linear`: weight and bias U(±1/√fan_in); `nn.LSTM`: every tensor U(±1/√hidden)).
//!
//! The saved state is peft's `prompt_embeddings` (`get_prompt_embedding_to_save`): the encoder's
//! output, which is the table itself when there is no encoder. A loaded directory therefore
//! runs as a table (peft's inference mode); an encoder cannot be restored from its output.
use std::sync::Mutex;

use ferrotune_plugin_api::{PluginError, PluginResult, TrainParam};
use tch::{Device, Kind, Tensor};

/// peft's key of a prompt-learning adapter's saved tensor.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";
/// The prefix of peft's parameter names of the (default) adapter's encoder.
const PREFIX: &str = "prompt_encoder.default.";

/// What turns the table into the prompt.
pub enum Head {
    /// The table is the prompt.
    Table,
    /// Linear layers with `act` between them (P-tuning's MLP: ReLU; prefix projection: tanh).
    Mlp { layers: Vec<(Tensor, Tensor)>, tanh: bool },
    /// P-tuning's bidirectional LSTM (torch's flat weights: per layer, per direction,
    /// `w_ih, w_hh, b_ih, b_hh`), then an MLP head (ReLU).
    Lstm { flat: Vec<Tensor>, layers: i64, hidden: i64, dropout: f64, head: Vec<(Tensor, Tensor)> },
}

/// A prompt-learning adapter's live tensors.
pub struct Encoder {
    /// `[n, width]`: the `embedding.weight` of peft's encoder.
    table: Tensor,
    head: Head,
    /// Every trainable tensor, named.
    params: Vec<(String, Tensor)>,
}

/// A linear layer initialised as torch's `nn.Linear` (weight and bias U(±1/√in)).
fn linear(inp: i64, out: i64, device: Device) -> PluginResult<(Tensor, Tensor)> {
    let bound = 1.0 / (inp as f64).sqrt();
    let w = Tensor::f_empty([out, inp], (Kind::Float, device))?.f_uniform_(-bound, bound)?;
    let b = Tensor::f_empty([out], (Kind::Float, device))?.f_uniform_(-bound, bound)?;
    Ok((w.set_requires_grad(true), b.set_requires_grad(true)))
}

fn mlp(x: &Tensor, layers: &[(Tensor, Tensor)], tanh: bool) -> PluginResult<Tensor> {
    let mut x = x.shallow_clone();
    for (i, (w, b)) in layers.iter().enumerate() {
        x = x.f_linear(w, Some(b))?;
        if i + 1 < layers.len() {
            x = if tanh { x.f_tanh()? } else { x.f_relu()? };
        }
    }
    Ok(x)
}

impl Encoder {
    /// A table alone (`table`: its initial values, `[n, width]`).
    pub fn table(table: Tensor) -> Self {
        let table = table.set_requires_grad(true);
        Self {
            params: vec![(PROMPT_EMBEDDINGS.into(), table.shallow_clone())],
            table,
            head: Head::Table,
        }
    }

    /// An N(0, 1) table (`nn.Embedding`'s default), or zeros.
    pub fn random_table(n: i64, width: i64, device: Device, zero: bool) -> PluginResult<Tensor> {
        let o = (Kind::Float, device);
        Ok(if zero { Tensor::f_zeros([n, width], o)? } else { Tensor::f_randn([n, width], o)? })
    }

    /// A table of `[n, inp]` through linear layers of widths `widths` (`tanh` or ReLU between).
    pub fn mlp(n: i64, inp: i64, widths: &[i64], tanh: bool, device: Device) -> PluginResult<Self> {
        let table = Self::random_table(n, inp, device, false)?.set_requires_grad(true);
        let name = if tanh { "transform" } else { "mlp_head" };
        let mut params = vec![(format!("{PREFIX}embedding.weight"), table.shallow_clone())];
        let (mut layers, mut width) = (Vec::new(), inp);
        for (i, &out) in widths.iter().enumerate() {
            let (w, b) = linear(width, out, device)?;
            // Sequential's indices count the activations too
            params.push((format!("{PREFIX}{name}.{}.weight", 2 * i), w.shallow_clone()));
            params.push((format!("{PREFIX}{name}.{}.bias", 2 * i), b.shallow_clone()));
            layers.push((w, b));
            width = out;
        }
        Ok(Self { table, head: Head::Mlp { layers, tanh }, params })
    }

    /// P-tuning's LSTM encoder: a `[n, token_dim]` table, a bidirectional LSTM of `layers`
    /// layers of width `hidden`, then Linear(2h, 2h), ReLU, Linear(2h, token_dim).
    pub fn lstm(
        n: i64,
        token_dim: i64,
        hidden: i64,
        layers: i64,
        dropout: f64,
        device: Device,
    ) -> PluginResult<Self> {
        let table = Self::random_table(n, token_dim, device, false)?.set_requires_grad(true);
        let mut params = vec![(format!("{PREFIX}embedding.weight"), table.shallow_clone())];
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut flat = Vec::new();
        for l in 0..layers {
            let inp = if l == 0 { token_dim } else { 2 * hidden };
            for suffix in ["", "_reverse"] {
                for (kind, shape) in [
                    ("weight_ih", vec![4 * hidden, inp]),
                    ("weight_hh", vec![4 * hidden, hidden]),
                    ("bias_ih", vec![4 * hidden]),
                    ("bias_hh", vec![4 * hidden]),
                ] {
                    let t = Tensor::f_empty(shape.as_slice(), (Kind::Float, device))?
                        .f_uniform_(-bound, bound)?
                        .set_requires_grad(true);
                    params.push((
                        format!("{PREFIX}lstm_head.{kind}_l{l}{suffix}"),
                        t.shallow_clone(),
                    ));
                    flat.push(t);
                }
            }
        }
        let mut head = Vec::new();
        for (i, (inp, out)) in
            [(2 * hidden, 2 * hidden), (2 * hidden, token_dim)].into_iter().enumerate()
        {
            let (w, b) = linear(inp, out, device)?;
            params.push((format!("{PREFIX}mlp_head.{}.weight", 2 * i), w.shallow_clone()));
            params.push((format!("{PREFIX}mlp_head.{}.bias", 2 * i), b.shallow_clone()));
            head.push((w, b));
        }
        Ok(Self { table, head: Head::Lstm { flat, layers, hidden, dropout, head }, params })
    }

    /// Zeros the projection's last layer (prefix tuning's `init_weights: "zero"`).
    pub fn zero_last(&self) -> PluginResult<()> {
        if let Head::Mlp { layers, .. } = &self.head {
            if let Some((w, b)) = layers.last() {
                tch::no_grad(|| -> PluginResult<()> {
                    let _ = w.shallow_clone().f_zero_()?;
                    let _ = b.shallow_clone().f_zero_()?;
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// The prompt, `[n, width]` (`train`: the LSTM's dropout on).
    pub fn forward(&self, train: bool) -> PluginResult<Tensor> {
        match &self.head {
            Head::Table => Ok(self.table.shallow_clone()),
            Head::Mlp { layers, tanh } => mlp(&self.table, layers, *tanh),
            Head::Lstm { flat, layers, hidden, dropout, head } => {
                let x = self.table.f_unsqueeze(0)?;
                let h0 = Tensor::f_zeros([2 * layers, 1, *hidden], (Kind::Float, x.device()))?;
                let params: Vec<&Tensor> = flat.iter().collect();
                let (y, _, _) =
                    x.f_lstm(&[&h0, &h0], &params, true, *layers, *dropout, train, true, true)?;
                mlp(&y.f_squeeze_dim(0)?, head, false)
            }
        }
    }

    pub fn parameters(&self) -> Vec<TrainParam> {
        self.params.iter().map(|(n, t)| TrainParam::new(n.clone(), t.shallow_clone())).collect()
    }

    /// peft's saved state: `prompt_embeddings`, the prompt without dropout.
    pub fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        let p = tch::no_grad(|| self.forward(false))?.f_detach_copy()?;
        Ok(vec![(PROMPT_EMBEDDINGS.into(), p)])
    }

    /// Copies a saved `prompt_embeddings` into the table: only where the table is the prompt.
    pub fn load_state_dict(
        &self,
        method: &str,
        tensors: Vec<(String, Tensor)>,
    ) -> PluginResult<()> {
        let mut found = None;
        for (name, t) in tensors {
            if name != PROMPT_EMBEDDINGS {
                return Err(PluginError::invalid(format!(
                    "unexpected tensor `{name}` in a {method} adapter (it holds `{PROMPT_EMBEDDINGS}` only)"
                )));
            }
            found = Some(t);
        }
        let Some(t) = found else {
            return Err(PluginError::invalid(format!(
                "the {method} state lacks `{PROMPT_EMBEDDINGS}`"
            )));
        };
        if !matches!(self.head, Head::Table) {
            return Err(PluginError::invalid(format!(
                "`{PROMPT_EMBEDDINGS}` of a {method} adapter is its encoder's output, and peft saves no encoder: a run \
                 with an encoder cannot start from or resume a saved directory (adapter_init, --resume). A directory loaded \
                 as a PEFT directory (generate --adapter, serve) runs as that table; to train that table on, set `inference_mode: true` in the adapter section"
            )));
        }
        if t.size() != self.table.size() {
            return Err(PluginError::invalid(format!(
                "`{PROMPT_EMBEDDINGS}`: shape {:?}, the {method} adapter's is {:?}",
                t.size(),
                self.table.size()
            )));
        }
        tch::no_grad(|| self.table.shallow_clone().f_copy_(&t))?;
        Ok(())
    }
}

/// An encoder built at `begin`.
#[derive(Default)]
pub struct Slot(Mutex<Option<Encoder>>);

impl Slot {
    pub fn set(&self, e: Encoder) -> PluginResult<()> {
        let mut g = self.0.lock().map_err(|_| PluginError::runtime("poisoned lock"))?;
        if g.is_some() {
            return Err(PluginError::runtime("begin was called twice"));
        }
        *g = Some(e);
        Ok(())
    }

    pub fn with<R>(&self, f: impl FnOnce(&Encoder) -> PluginResult<R>) -> PluginResult<R> {
        let g = self.0.lock().map_err(|_| PluginError::runtime("poisoned lock"))?;
        match g.as_ref() {
            Some(e) => f(e),
            None => Err(PluginError::runtime("the adapter is used before begin (no model yet)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// The LSTM through ATen's kernel equals the cell equations written out (both directions,
    /// two layers), and the names are torch's.
    #[test]
    fn lstm_equals_its_equations() {
        tch::manual_seed(1);
        let (n, d, h) = (5, 6, 4);
        let e = Encoder::lstm(n, d, h, 2, 0.0, Device::Cpu).unwrap();
        let Head::Lstm { flat, head, .. } = &e.head else { unreachable!() };
        let run = |x: &Tensor, w: &[Tensor], rev: bool| {
            let (wi, wh, bi, bh) = (&w[0], &w[1], &w[2], &w[3]);
            let mut hs: Vec<Tensor> =
                (0..n).map(|_| Tensor::zeros([h], (Kind::Float, Device::Cpu))).collect();
            let (mut hh, mut c) = (
                Tensor::zeros([h], (Kind::Float, Device::Cpu)),
                Tensor::zeros([h], (Kind::Float, Device::Cpu)),
            );
            let order: Vec<i64> = if rev { (0..n).rev().collect() } else { (0..n).collect() };
            for t in order {
                let g = x.get(t).linear(wi, Some(bi)) + hh.linear(wh, Some(bh));
                let g = g.chunk(4, 0);
                let (i, f, gg, o) = (g[0].sigmoid(), g[1].sigmoid(), g[2].tanh(), g[3].sigmoid());
                c = f * &c + i * gg;
                hh = o * c.tanh();
                hs[t as usize] = hh.shallow_clone();
            }
            Tensor::stack(&hs, 0)
        };
        let mut x = e.table.detach();
        for l in 0..2 {
            let w = &flat[l * 8..l * 8 + 8];
            x = Tensor::cat(&[run(&x, &w[..4], false), run(&x, &w[4..], true)], 1);
        }
        let want = mlp(&x, head, false).unwrap();
        assert!(max_diff(&e.forward(false).unwrap(), &want) < 1e-5);
        let names: Vec<_> = e.params.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"prompt_encoder.default.lstm_head.weight_ih_l1_reverse"));
        assert!(names.contains(&"prompt_encoder.default.mlp_head.2.bias"));
    }

    /// Dropout between the LSTM's layers acts while training only.
    #[test]
    fn lstm_dropout_trains_only() {
        tch::manual_seed(2);
        let e = Encoder::lstm(4, 6, 5, 2, 0.5, Device::Cpu).unwrap();
        let eval = e.forward(false).unwrap();
        assert_eq!(max_diff(&eval, &e.forward(false).unwrap()), 0.0);
        assert!(max_diff(&eval, &e.forward(true).unwrap()) > 1e-4);
    }

    #[test]
    fn an_encoder_refuses_its_saved_output_and_a_table_checks_the_shape() {
        let e = Encoder::mlp(3, 4, &[5, 5, 4], false, Device::Cpu).unwrap();
        let saved = e.state_dict().unwrap();
        assert_eq!(saved[0].1.size(), [3, 4]);
        let msg = e.load_state_dict("P-tuning", saved).unwrap_err().to_string();
        assert!(msg.contains("`prompt_embeddings`") && msg.contains("encoder"), "{msg}");
        let t = Encoder::table(Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)));
        let bad =
            vec![(PROMPT_EMBEDDINGS.to_string(), Tensor::ones([2, 4], (Kind::Float, Device::Cpu)))];
        let msg = t.load_state_dict("prompt tuning", bad).unwrap_err().to_string();
        assert!(msg.contains("[2, 4]") && msg.contains("[3, 4]"), "{msg}");
    }
}
