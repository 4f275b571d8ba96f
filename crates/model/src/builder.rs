//! The graph-building context shared by the blocks: allocates transient activations in
//! the backend's pool and appends named nodes.

use moeflux_core::{Act, BufId, BufferPool, Graph, Lifetime, Op, PoolExt, Pos};

use crate::error::ModelError;

pub struct Builder<'p> {
    pool: &'p mut dyn BufferPool,
    pub graph: Graph,
    /// Tokens in the batch this graph processes.
    pub n: usize,
    pub pos: BufId<Pos>,
    layer: Option<usize>,
}

impl<'p> Builder<'p> {
    pub fn new(pool: &'p mut dyn BufferPool, name: String, n: usize, pos: BufId<Pos>) -> Self {
        Builder {
            pool,
            graph: Graph::new(name),
            n,
            pos,
            layer: None,
        }
    }

    pub fn pool(&mut self) -> &mut dyn BufferPool {
        self.pool
    }

    pub fn layer(&self) -> Option<usize> {
        self.layer
    }

    pub fn set_layer(&mut self, layer: Option<usize>) {
        self.layer = layer;
    }

    /// A transient `[n, width]` activation.
    pub fn act(&mut self, width: usize, role: &str) -> Result<BufId<Act>, ModelError> {
        let label = match self.layer {
            Some(l) => format!("L{l}.{role}"),
            None => role.to_string(),
        };
        Ok(self
            .pool
            .alloc::<Act>(self.n * width * 4, &label, Lifetime::Transient)?)
    }

    pub fn push(&mut self, role: &'static str, op: Op) {
        self.graph.push(self.layer, role, op);
    }

    /// `x @ w^T` into a fresh activation.
    pub fn matmul(
        &mut self,
        x: BufId<Act>,
        w: &moeflux_core::Matrix,
        role: &'static str,
    ) -> Result<BufId<Act>, ModelError> {
        let out = self.act(w.rows, role)?;
        self.push(
            role,
            Op::Matmul {
                x,
                w: *w,
                out,
                n: self.n,
            },
        );
        Ok(out)
    }
}
