//! The host's frozen linear layer: the one type every linear layer of a model goes through,
//! so that adapter and quantizer plugins can wrap it.
use ferrotune_plugin_api::{BaseLinear, PluginResult};
use tch::{TchError, Tensor};

/// `y = x Wᵀ + b` with a frozen weight `[out, in]`.
pub struct FrozenLinear {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { name: name.into(), weight: weight.set_requires_grad(false), bias: bias.map(|b| b.set_requires_grad(false)) }
    }

    /// `x Wᵀ + b` over the last dimension of `x`; a shape mismatch is an error, not a panic.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.weight, self.bias.as_ref())
    }

    /// Input width (`in_features`).
    pub fn in_features(&self) -> i64 {
        self.weight.size().get(1).copied().unwrap_or(0)
    }

    /// Output width (`out_features`).
    pub fn out_features(&self) -> i64 {
        self.weight.size().first().copied().unwrap_or(0)
    }
}

impl BaseLinear for FrozenLinear {
    fn name(&self) -> PluginResult<String> {
        Ok(self.name.clone())
    }
    fn shape(&self) -> PluginResult<(i64, i64)> {
        let s = self.weight.size2()?;
        Ok(s)
    }
    fn forward(&self, x: &Tensor) -> PluginResult<Tensor> {
        Ok(FrozenLinear::forward(self, x)?)
    }
    fn weight(&self) -> PluginResult<Tensor> {
        Ok(self.weight.shallow_clone())
    }
    fn bias(&self) -> PluginResult<Option<Tensor>> {
        Ok(self.bias.as_ref().map(Tensor::shallow_clone))
    }
}
