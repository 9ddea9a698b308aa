//! A tiny pure-tch model behind [`ObjectiveContext`] for the objectives' unit tests: an
//! embedding, a causal mean over the positions, and linear LM / score / value heads, with
//! deterministic generation and two rule rewards. It records what it was asked.
use ferrotune_plugin_api::prelude::*;
use ferrotune_plugin_api::{
    logps_from_logits, RewardScores, SCORES, TARGET_IDS, TARGET_TEMPERATURE, VALUES,
};
use std::cell::RefCell;

pub struct TinyModel {
    pub vocab: i64,
    pub embed: Tensor,
    pub lm_head: Tensor,
    /// The reference's head (what `DISABLE_ADAPTER` runs): the policy's at its start.
    pub ref_head: Tensor,
    pub score: Tensor,
    pub v_head: Tensor,
    pub eos: i64,
    /// Answer without `scores` / `values` (a host that predates the flags).
    pub no_scores: bool,
    pub nan_scores: bool,
    pub calls: RefCell<Vec<ForwardFlags>>,
    /// `input_ids` of every forward.
    pub forward_ids: RefCell<Vec<Tensor>>,
    /// `pixel_values` of every forward (None: the forward had none).
    pub forward_pixels: RefCell<Vec<Option<Tensor>>>,
    /// (prompts, options JSON) of every `generate`.
    pub generated: RefCell<Vec<(Vec<Vec<i64>>, serde_json::Value)>>,
    pub reward_calls: RefCell<usize>,
    /// The completion texts the rewards scored.
    pub rewarded: RefCell<Vec<String>>,
}

impl TinyModel {
    pub fn new(vocab: i64, hidden: i64, eos: i64) -> Self {
        let init = |shape: &[i64], seed: f64| {
            let n: i64 = shape.iter().product();
            Tensor::arange(n, (Kind::Float, Device::Cpu))
                .f_mul_scalar(0.71)
                .unwrap()
                .f_add_scalar(seed)
                .unwrap()
                .sin()
                .view(shape)
        };
        let lm_head = init(&[hidden, vocab], 0.3);
        Self {
            vocab,
            embed: init(&[vocab, hidden], 0.1).set_requires_grad(true),
            ref_head: lm_head.f_mul_scalar(0.8).unwrap(),
            lm_head: lm_head.set_requires_grad(true),
            score: init(&[hidden], 0.7).set_requires_grad(true),
            v_head: init(&[hidden], 1.3).set_requires_grad(true),
            eos,
            no_scores: false,
            nan_scores: false,
            calls: RefCell::new(Vec::new()),
            forward_ids: RefCell::new(Vec::new()),
            forward_pixels: RefCell::new(Vec::new()),
            generated: RefCell::new(Vec::new()),
            reward_calls: RefCell::new(0),
            rewarded: RefCell::new(Vec::new()),
        }
    }

    /// `[B, T, H]`: tanh of the running mean of the embeddings (causal).
    pub fn hidden(&self, ids: &Tensor) -> Tensor {
        let t = ids.size()[1];
        let e = self.embed.index_select(0, &ids.reshape([-1])).view([ids.size()[0], t, -1]);
        let n = Tensor::arange_start(1, t + 1, (Kind::Float, Device::Cpu)).view([1, t, 1]);
        (e.cumsum(1, Kind::Float) / n).tanh()
    }

    pub fn logits(&self, ids: &Tensor, reference: bool) -> Tensor {
        let head = if reference { &self.ref_head } else { &self.lm_head };
        self.hidden(ids).matmul(head)
    }

    pub fn scores(&self, ids: &Tensor) -> Tensor {
        self.hidden(ids).matmul(&self.score)
    }

    pub fn values(&self, ids: &Tensor) -> Tensor {
        self.hidden(ids).matmul(&self.v_head)
    }

    fn run(
        &self,
        inputs: &[(String, Tensor)],
        flags: ForwardFlags,
    ) -> PluginResult<Vec<(String, Tensor)>> {
        let get = |name: &str| inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let ids = get("input_ids").expect("input_ids");
        self.forward_ids.borrow_mut().push(ids.shallow_clone());
        self.forward_pixels.borrow_mut().push(get("pixel_values").map(Tensor::shallow_clone));
        let mut out = Vec::new();
        if flags.contains(ForwardFlags::SCORES) && !self.no_scores {
            let s = self.scores(ids);
            out.push((SCORES.to_string(), if self.nan_scores { s / 0.0 * 0.0 } else { s }));
        }
        if flags.contains(ForwardFlags::VALUES) && !self.no_scores {
            out.push((VALUES.to_string(), self.values(ids)));
        }
        let reference = flags.contains(ForwardFlags::DISABLE_ADAPTER);
        if flags.contains(ForwardFlags::TARGET_LOGPS) {
            let targets = get(TARGET_IDS).expect("target_ids");
            let temperature = get(TARGET_TEMPERATURE).map_or(1.0, |t| t.double_value(&[]));
            let lp = logps_from_logits(&self.logits(ids, reference), targets, temperature, flags)?;
            out.push(("target_logps".into(), lp.logps));
            out.push(("target_correct".into(), lp.correct));
            if let Some(e) = lp.entropy {
                out.push(("target_entropy".into(), e));
            }
        } else if !flags.contains(ForwardFlags::SCORES) && !flags.contains(ForwardFlags::VALUES) {
            out.push(("logits".into(), self.logits(ids, reference)));
        }
        Ok(out)
    }

    /// The completion `generate` gives for a prompt under a seed: 1 to 4 tokens in
    /// [2, vocab), ending with EOS when the prompt's sum plus the seed is even.
    pub fn completion(&self, prompt: &[i64], seed: u64, max_new: usize) -> Vec<i64> {
        let s = prompt.iter().sum::<i64>() + seed as i64;
        let len = (s % 4 + 1) as usize;
        let mut c: Vec<i64> =
            (0..len as i64).map(|i| 2 + (s * 3 + i * 5) % (self.vocab - 2)).collect();
        if s % 2 == 0 {
            c.push(self.eos);
        }
        c.truncate(max_new);
        c
    }
}

impl ObjectiveContext for TinyModel {
    fn forward(
        &self,
        inputs: &[(String, Tensor)],
        flags: ForwardFlags,
    ) -> PluginResult<Vec<(String, Tensor)>> {
        self.calls.borrow_mut().push(flags);
        if flags.contains(ForwardFlags::NO_GRAD) {
            tch::no_grad(|| self.run(inputs, flags))
        } else {
            self.run(inputs, flags)
        }
    }
    fn generate(&self, prompts: &[Vec<i64>], options_json: &str) -> PluginResult<Vec<Vec<i64>>> {
        let options: serde_json::Value = serde_json::from_str(options_json).unwrap();
        let seed = options["seed"].as_u64().unwrap();
        let max_new = options["max_new_tokens"].as_u64().unwrap() as usize;
        self.generated.borrow_mut().push((prompts.to_vec(), options));
        Ok(prompts.iter().map(|p| self.completion(p, seed, max_new)).collect())
    }
    fn decode(&self, ids: &[i64]) -> PluginResult<String> {
        Ok(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "))
    }
    /// `tokens` (weight 0.5): the completion's tokens; `threes` (weight 1): its `3`s.
    fn rewards(&self, inputs: &[RewardInput]) -> PluginResult<Vec<RewardScores>> {
        *self.reward_calls.borrow_mut() += 1;
        self.rewarded.borrow_mut().extend(inputs.iter().map(|i| i.completion.clone()));
        let words = |s: &str| s.split(' ').filter(|w| !w.is_empty()).count() as f64;
        let threes = |s: &str| s.split(' ').filter(|w| *w == "3").count() as f64;
        Ok(vec![
            RewardScores {
                name: "tokens".into(),
                weight: 0.5,
                scores: inputs.iter().map(|i| words(&i.completion)).collect(),
            },
            RewardScores {
                name: "threes".into(),
                weight: 1.0,
                scores: inputs.iter().map(|i| threes(&i.completion)).collect(),
            },
        ])
    }
}
