//! The process group handed to memory plugins. One process for now; the c10d-backed group
//! (Gloo/NCCL through a C++ layer) arrives with multi-rank training.
use ferrotune_plugin_api::{Collectives, PluginError, PluginResult, ReduceOp};
use tch::Tensor;

/// A world of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&self, _tensor: &Tensor, _op: ReduceOp) -> PluginResult<()> {
        Ok(())
    }
    fn broadcast(&self, _tensor: &Tensor, root: usize) -> PluginResult<()> {
        if root != 0 {
            return Err(PluginError::invalid(format!("broadcast root {root} in a world of 1")));
        }
        Ok(())
    }
    fn all_gather(&self, tensor: &Tensor) -> PluginResult<Vec<Tensor>> {
        Ok(vec![tensor.shallow_clone()])
    }
    fn reduce_scatter(&self, output: &Tensor, input: &Tensor, _op: ReduceOp) -> PluginResult<()> {
        tch::no_grad(|| output.shallow_clone().f_copy_(input))?;
        Ok(())
    }
    fn barrier(&self) -> PluginResult<()> {
        Ok(())
    }
}
